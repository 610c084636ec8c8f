"""Row-wise multiview self-attention (MV-Adapter T2MV) as diffusers attention processors.

``MVRowAttnProcessor`` replaces every ``attn1`` of the SDXL UNet. It is an ``nn.Module`` that owns
``to_q_mv``, ``to_k_mv``, ``to_v_mv`` and ``to_out_mv`` ([Linear, Dropout]), so the UNet's state-dict keys
are ``...attn1.processor.to_q_mv.weight`` exactly as in ``mvadapter_t2mv_sdxl.safetensors``. Both branches
read the same normed input x:

    out = (to_out(SA(x)) + mv_scale · to_out_mv(RowMVA(x))) / rescale_output_factor

RowMVA lets every token attend to the same image row in all V views (its own included). It is done by
reshape only (reference `mvadapter.md` §1 "reshape-only equivalent"): no per-view copy of K/V. Every
reshape keeps the batch axis as -1, so a traced or exported graph never freezes the batch.

Per-call settings travel with the call: the number of views, the latent size (from which each UNet level's
(h, w) token grid follows, non-square included) and the MV scale reach the processors as
``cross_attention_kwargs`` (``unet(..., cross_attention_kwargs=MVSettings(...).attention_kwargs())``, the
keyword names MV-Adapter itself passes). No processor holds per-call state, so several backends (eager,
compiled, CUDA graph, a trainer's DDP copy) can share one UNet without writing into each other's calls.

``PlainAttnProcessor`` is the standard SDPA attention with the same -1 batch discipline, for ``attn2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MVSettings:
    """What shapes one UNet call's multiview attention: immutable, passed per call (never shared state)."""

    num_views: int = 6
    latent_height: int = 96
    latent_width: int = 96
    mv_scale: float = 1.0

    def grid(self, seq_len: int) -> tuple[int, int]:
        """(h, w) of the token grid at a UNet level holding ``seq_len`` tokens."""
        return token_grid((self.latent_height, self.latent_width), seq_len)

    def attention_kwargs(self) -> dict[str, Any]:
        """The UNet's ``cross_attention_kwargs`` for this call (plain Python values: baked into a trace)."""
        return {"num_views": int(self.num_views), "latent_size": (int(self.latent_height), int(self.latent_width)),
                "mv_scale": float(self.mv_scale)}

    def for_sample(self, sample: torch.Tensor, num_views: int) -> MVSettings:
        """These settings for a UNet input ``sample[B·V, C, h, w]`` of ``num_views`` views per prompt."""
        return replace(self, num_views=int(num_views), latent_height=int(sample.shape[-2]),
                       latent_width=int(sample.shape[-1]))


def token_grid(latent_size: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """(h, w) of the token grid of a UNet level with ``seq_len`` tokens, for a ``latent_size`` = (H, W) input
    (each downsampling halves both sides, rounding up)."""
    lh, lw = int(latent_size[0]), int(latent_size[1])
    factor = round(math.sqrt(lh * lw / seq_len))
    h, w = -(-lh // factor), -(-lw // factor)
    if h * w != seq_len:
        raise ValueError(f"cannot place {seq_len} tokens on a grid of the {lh}x{lw} latent; pass the UNet input's "
                         "latent_size in cross_attention_kwargs")
    return h, w


def _heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, C) -> (N, heads, L, d), batch kept symbolic."""
    n_tokens, channels = x.shape[-2], x.shape[-1]
    return x.reshape(-1, n_tokens, heads, channels // heads).transpose(1, 2)


def _heads_merge(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, L, heads*d)."""
    heads, n_tokens, d = x.shape[1], x.shape[2], x.shape[3]
    return x.transpose(1, 2).reshape(-1, n_tokens, heads * d)


def standard_attention(attn, hidden_states: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """to_out(SDPA(to_q(x), to_k(ctx), to_v(ctx))), without residual or rescale."""
    context = hidden_states if context is None else context
    if attn.norm_cross and context is not hidden_states:
        context = attn.norm_encoder_hidden_states(context)
    q = _heads_split(attn.to_q(hidden_states), attn.heads)
    k = _heads_split(attn.to_k(context), attn.heads)
    v = _heads_split(attn.to_v(context), attn.heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = _heads_merge(F.scaled_dot_product_attention(q, k, v)).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def row_multiview_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, num_views: int, h: int, w: int
) -> torch.Tensor:
    """Row-wise attention across views by reshape only.

    q, k, v: (B·V, h·w, C), views contiguous per prompt. Returns (B·V, h·w, C).
    (B, V, h, w, H, d) -> (B, h, H, V, w, d) -> (B·h, H, V·w, d): one SDPA in which each query of row i in any
    view sees the V·w keys of row i of all views.
    """
    channels = q.shape[-1]
    d = channels // heads

    def to_rows(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, num_views, h, w, heads, d).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, heads, num_views * w, d)

    out = F.scaled_dot_product_attention(to_rows(q), to_rows(k), to_rows(v))
    out = out.reshape(-1, h, heads, num_views, w, d).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(-1, h * w, channels)


class ProcessorModule(nn.Module):
    """An attention processor that is an ``nn.Module`` and names the per-call keywords it takes.

    diffusers' ``Attention.forward`` drops every ``cross_attention_kwargs`` key not in the signature of
    ``processor.__call__``, so ``__call__`` spells them out (``nn.Module.__call__`` alone is ``*args,
    **kwargs``, which would silently drop them) and forwards to the module machinery (hooks, ``forward``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 num_views: int | None = None, latent_size: tuple[int, int] | None = None, mv_scale: float = 1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                num_views=num_views, latent_size=latent_size, mv_scale=mv_scale)


def mv_grid(hidden_states: torch.Tensor, num_views: int | None, latent_size: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) token grid of this call, or a clear error when the caller did not say it."""
    if num_views is None or latent_size is None:
        raise ValueError("the multiview attention needs num_views and latent_size per call: pass "
                         "cross_attention_kwargs=MVSettings(...).attention_kwargs() to the UNet")
    return token_grid(latent_size, int(hidden_states.shape[1]))


class PlainAttnProcessor(ProcessorModule):
    """SDPA attention (self or cross) with -1 batch reshapes; used for ``attn2``. Has no parameters."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **mv_call):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not used by the SDXL UNet")
        residual = hidden_states
        out = standard_attention(attn, hidden_states, encoder_hidden_states)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class MVRowAttnProcessor(ProcessorModule):
    """Self-attention plus the parallel row-wise multiview branch (MV-Adapter ``attn1``)."""

    def __init__(self, query_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q_mv = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k_mv = nn.Linear(query_dim, query_dim, bias=False)
        self.to_v_mv = nn.Linear(query_dim, query_dim, bias=False)
        self.to_out_mv = nn.ModuleList([nn.Linear(query_dim, query_dim, bias=True), nn.Dropout(0.0)])

    @torch.no_grad()
    def init_from_attention(self, attn) -> None:
        """MV-Adapter init: copy q/k/v/out weights from attn1, then zero ``to_out_mv`` (weight and bias)."""
        self.to_q_mv.weight.copy_(attn.to_q.weight)
        self.to_k_mv.weight.copy_(attn.to_k.weight)
        self.to_v_mv.weight.copy_(attn.to_v.weight)
        self.to_out_mv[0].weight.zero_()
        self.to_out_mv[0].bias.zero_()

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                num_views=None, latent_size=None, mv_scale=1.0):
        if encoder_hidden_states is not None:
            raise ValueError("MVRowAttnProcessor is for self-attention (attn1) only")
        residual = hidden_states
        out = standard_attention(attn, hidden_states, None)
        if mv_scale != 0.0:
            h, w = mv_grid(hidden_states, num_views, latent_size)
            mv = row_multiview_attention(
                self.to_q_mv(hidden_states),
                self.to_k_mv(hidden_states),
                self.to_v_mv(hidden_states),
                self.heads,
                int(num_views),
                h,
                w,
            )
            out = out + mv_scale * self.to_out_mv[1](self.to_out_mv[0](mv))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_mv_processors(unet, *, init_from_base: bool = True) -> int:
    """Put ``MVRowAttnProcessor`` on every ``attn1`` and ``PlainAttnProcessor`` on every ``attn2``.

    Returns the number of multiview blocks (70 for SDXL). ``init_from_base`` copies the attn1 weights into
    the MV branch and zeroes ``to_out_mv`` (so the model equals the base UNet until weights are loaded).
    """
    from diffusers.models.attention_processor import Attention

    processors = {}
    count = 0
    ref = next(unet.parameters())
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        key = f"{name}.processor"
        if name.endswith("attn1"):
            proc = MVRowAttnProcessor(module.to_q.in_features, module.heads)
            if init_from_base:
                proc.init_from_attention(module)
            processors[key] = proc.to(device=ref.device, dtype=ref.dtype)
            count += 1
        else:
            processors[key] = PlainAttnProcessor()
    unet.set_attn_processor(processors)
    return count


def mv_processors(unet) -> dict[str, MVRowAttnProcessor]:
    return {k: p for k, p in unet.attn_processors.items() if isinstance(p, MVRowAttnProcessor)}
