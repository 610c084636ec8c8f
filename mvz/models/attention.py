"""Row-wise multiview self-attention (MV-Adapter T2MV) as diffusers attention processors.

``MVRowAttnProcessor`` replaces every ``attn1`` of the SDXL UNet. It is an ``nn.Module`` that owns
``to_q_mv``, ``to_k_mv``, ``to_v_mv`` and ``to_out_mv`` ([Linear, Dropout]), so the UNet's state-dict keys
are ``...attn1.processor.to_q_mv.weight`` exactly as in ``mvadapter_t2mv_sdxl.safetensors``. Both branches
read the same normed input x:

    out = (to_out(SA(x)) + mv_scale · to_out_mv(RowMVA(x))) / rescale_output_factor

RowMVA lets every token attend to the same image row in all V views (its own included). It is done by
reshape only (``docs/architecture.md``, *Row-wise attention by reshape*): no per-view copy of K/V. Every
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
from dataclasses import dataclass
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
    return attention_output(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))


def attention_output(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """to_out(SDPA(q, k, v)) of projected (N, L, C) queries, keys and values, per head of ``attn``."""
    q, k, v = (_heads_split(x, attn.heads) for x in (q, k, v))
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
    """Self-attention plus the parallel row-wise multiview branch (MV-Adapter ``attn1``).

    Optionally with fused projections (:meth:`fuse_projections`, as diffusers' ``fuse_projections``): one
    GEMM for q, k, v of the base branch and of the MV branch (6C wide); the six ``Linear`` weights then
    become views into the fused weight (no second copy), kept out of the state dict (a non-persistent
    buffer), so the keys stay MV-Adapter's. :meth:`unfuse_projections` returns to six GEMMs."""

    def __init__(self, query_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q_mv = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k_mv = nn.Linear(query_dim, query_dim, bias=False)
        self.to_v_mv = nn.Linear(query_dim, query_dim, bias=False)
        self.to_out_mv = nn.ModuleList([nn.Linear(query_dim, query_dim, bias=True), nn.Dropout(0.0)])
        self.register_buffer("fused_qkv", None, persistent=False)  # [6C, C] while fused

    def _linears(self, attn) -> list[nn.Linear]:
        return [attn.to_q, attn.to_k, attn.to_v, self.to_q_mv, self.to_k_mv, self.to_v_mv]

    @torch.no_grad()
    def fuse_projections(self, attn) -> None:
        """One weight for the six q/k/v projections; the ``Linear`` weights become views into it."""
        if self.fused_qkv is not None:
            return
        linears = self._linears(attn)
        c = attn.to_q.in_features
        self.fused_qkv = torch.cat([lin.weight.detach() for lin in linears])
        for i, lin in enumerate(linears):  # share storage: no second copy of the weights
            lin.weight = nn.Parameter(self.fused_qkv[i * c:(i + 1) * c], requires_grad=False)

    @torch.no_grad()
    def unfuse_projections(self, attn) -> None:
        """Back to six projections, each with its own storage (the fused buffer is dropped)."""
        if self.fused_qkv is None:
            return
        for lin in self._linears(attn):
            lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        self.fused_qkv = None

    def projections(self, attn, x: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v of the base branch and of the MV branch: six GEMMs, or one when fused."""
        if self.fused_qkv is None:
            return [lin(x) for lin in self._linears(attn)]
        parts = list(F.linear(x, self.fused_qkv).chunk(6, dim=-1))
        for i, lin in enumerate(self._linears(attn)):
            if lin.bias is not None:
                parts[i] = parts[i] + lin.bias
        return parts

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
        q, k, v, q_mv, k_mv, v_mv = self.projections(attn, hidden_states)
        out = attention_output(attn, q, k, v)
        if mv_scale != 0.0:
            h, w = mv_grid(hidden_states, num_views, latent_size)
            mv = row_multiview_attention(q_mv, k_mv, v_mv, self.heads, int(num_views), h, w)
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
