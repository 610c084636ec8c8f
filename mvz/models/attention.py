"""Row-wise multiview self-attention (MV-Adapter T2MV) as diffusers attention processors.

``MVRowAttnProcessor`` replaces every ``attn1`` of the SDXL UNet. It is an ``nn.Module`` that owns
``to_q_mv``, ``to_k_mv``, ``to_v_mv`` and ``to_out_mv`` ([Linear, Dropout]), so the UNet's state-dict keys
are ``...attn1.processor.to_q_mv.weight`` exactly as in ``mvadapter_t2mv_sdxl.safetensors``. Both branches
read the same normed input x:

    out = (to_out(SA(x)) + mv_scale · to_out_mv(RowMVA(x))) / rescale_output_factor

RowMVA lets every token attend to the same image row in all V views (its own included). It is done by
reshape only (reference `mvadapter.md` §1 "reshape-only equivalent"): no per-view copy of K/V. Every
reshape keeps the batch axis as -1, so a traced or exported graph never freezes the batch; the spatial grid
(h, w) per UNet level comes from the shared :class:`MVSettings` (latent size, number of views), which may
be non-square.

``PlainAttnProcessor`` is the standard SDPA attention with the same -1 batch discipline, for ``attn2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MVSettings:
    """Shared by all processors of one UNet. Set before a forward (the denoiser does it)."""

    num_views: int = 6
    latent_height: int = 96
    latent_width: int = 96
    mv_scale: float = 1.0

    def grid(self, seq_len: int) -> tuple[int, int]:
        """(h, w) of the token grid at a UNet level holding ``seq_len`` tokens."""
        factor = round(math.sqrt(self.latent_height * self.latent_width / seq_len))
        h = -(-self.latent_height // factor)
        w = -(-self.latent_width // factor)
        if h * w != seq_len:
            raise ValueError(
                f"cannot place {seq_len} tokens on a grid of the {self.latent_height}x{self.latent_width} latent; "
                "set MVSettings.latent_height/width to the UNet input size"
            )
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


class PlainAttnProcessor(nn.Module):
    """SDPA attention (self or cross) with -1 batch reshapes; used for ``attn2``. Has no parameters."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not used by the SDXL UNet")
        residual = hidden_states
        out = standard_attention(attn, hidden_states, encoder_hidden_states)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    __call__ = nn.Module.__call__


class MVRowAttnProcessor(nn.Module):
    """Self-attention plus the parallel row-wise multiview branch (MV-Adapter ``attn1``)."""

    def __init__(self, query_dim: int, heads: int, settings: MVSettings):
        super().__init__()
        self.heads = heads
        self.settings = settings
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

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("MVRowAttnProcessor is for self-attention (attn1) only")
        residual = hidden_states
        out = standard_attention(attn, hidden_states, None)
        s = self.settings
        if s.mv_scale != 0.0:
            h, w = s.grid(hidden_states.shape[1])
            mv = row_multiview_attention(
                self.to_q_mv(hidden_states),
                self.to_k_mv(hidden_states),
                self.to_v_mv(hidden_states),
                self.heads,
                s.num_views,
                h,
                w,
            )
            out = out + s.mv_scale * self.to_out_mv[1](self.to_out_mv[0](mv))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    __call__ = nn.Module.__call__


def install_mv_processors(unet, settings: MVSettings, init_from_base: bool = True) -> int:
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
            proc = MVRowAttnProcessor(module.to_q.in_features, module.heads, settings)
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
