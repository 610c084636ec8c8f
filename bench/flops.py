"""Compute floor: FLOPs of the UNet (base and multiview branch), the camera adapter and the VAE decoder.

Counted, not hard-coded: the networks are rebuilt from the loaded model's configuration on the ``meta``
device (no memory, no arithmetic) and run once at the benchmark's shapes while a ``TorchFunctionMode``
records every ``conv2d``, ``linear``, ``scaled_dot_product_attention`` and batched matmul with its real
operand shapes. As in ``docs/architecture.md`` (*Compute floor*), only multiply-adds are counted (2 FLOPs per MAC):
convolutions, linears and attention's QKᵀ and AV; norms, activations, softmax and resampling are not.

Categories:

* ``unet_base``: everything in the UNet except the MV branch;
* ``mv_proj``: the MV branch's ``to_{q,k,v,out}_mv`` linears;
* ``mv_attention``: the row-wise multiview SDPA (QKᵀ and AV over V·w keys);
* ``vae_decoder`` (incl. ``post_quant_conv``) and ``camera_adapter``.

At 768 px, 6 views, batch 1 this gives 3.64 TFLOP (base UNet) and 4.21 TFLOP per view (UNet + MV), and
5.75 TFLOP per VAE-decoded image (``docs/architecture.md``, *Compute floor*).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# ---- per-op formulas (2 FLOPs per multiply-add) ------------------------------------------------------


def conv_flops(out_shape, in_channels: int, kernel: tuple[int, ...], groups: int = 1) -> int:
    """Each output element costs (C_in/groups)·prod(kernel) MACs."""
    return 2 * math.prod(out_shape) * (in_channels // groups) * math.prod(kernel)


def linear_flops(in_shape, out_features: int) -> int:
    """x[..., in] @ W[out, in]ᵀ: rows · in · out MACs."""
    return 2 * math.prod(in_shape) * out_features


def sdpa_flops(q_shape, k_shape, v_shape) -> int:
    """QKᵀ (L·S·d) and AV (L·S·d_v) MACs for every batch·head."""
    batch = math.prod(q_shape[:-2])
    length, d = q_shape[-2], q_shape[-1]
    keys, dv = k_shape[-2], v_shape[-1]
    return 2 * batch * length * keys * (d + dv)


def matmul_flops(a_shape, b_shape) -> int:
    if len(a_shape) < 2 or len(b_shape) < 2:
        return 2 * math.prod(a_shape)  # vector products: negligible, counted roughly
    batch = max(math.prod(a_shape[:-2]), math.prod(b_shape[:-2]))
    return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]


# ---- the counting mode ------------------------------------------------------------------------------


class FlopCounter(TorchFunctionMode):
    """Counts FLOPs of functional calls, attributed to a category chosen by the module scope.

    Use :meth:`attach` on a module to track the scope (forward pre/post hooks) and ``with counter:``
    around its forward. ``counts`` maps category -> FLOPs; ``by_op`` maps op name -> FLOPs.
    """

    def __init__(self, categorize=None):
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)
        self.by_op: dict[str, int] = defaultdict(int)
        self.scope: list[str] = []
        self.flags: set[str] = set()
        self.categorize = categorize or (lambda scope, flags, op: "total")
        self._handles: list = []

    def attach(self, module: torch.nn.Module, prefix: str = "") -> FlopCounter:
        for name, sub in module.named_modules():
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            self._handles.append(sub.register_forward_pre_hook(lambda _m, _a, n=full: self._enter(n)))
            self._handles.append(sub.register_forward_hook(lambda _m, _a, _o: self._leave()))
        return self

    def _enter(self, name: str) -> None:  # hooks must return None (a value would replace the output)
        self.scope.append(name)

    def _leave(self) -> None:
        if self.scope:
            self.scope.pop()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def flag(self, name: str):
        self.flags.add(name)
        try:
            yield
        finally:
            self.flags.discard(name)

    def add(self, op: str, flops: int) -> None:
        where = self.scope[-1] if self.scope else ""
        self.counts[self.categorize(where, self.flags, op)] += int(flops)
        self.by_op[op] += int(flops)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._count(func, args, kwargs, out)
        except Exception:  # counting must never break the forward
            pass
        return out

    def _count(self, func, args, kwargs, out) -> None:
        if func is F.conv2d or func is F.conv1d or func is F.conv3d or func is torch.conv2d:
            x, w = args[0], args[1]
            groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
            self.add("conv", conv_flops(out.shape, x.shape[1], tuple(w.shape[2:]), groups))
        elif func is F.linear:
            x, w = args[0], args[1]
            self.add("linear", linear_flops(x.shape, w.shape[0]))
        elif func is F.scaled_dot_product_attention:
            q = args[0]
            k = args[1] if len(args) > 1 else kwargs["key"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            self.add("sdpa", sdpa_flops(q.shape, k.shape, v.shape))
        elif func in (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm):
            self.add("matmul", matmul_flops(args[0].shape, args[1].shape))
        elif func in (torch.baddbmm, torch.Tensor.baddbmm):
            self.add("matmul", matmul_flops(args[1].shape, args[2].shape))


def unet_category(scope: str, flags: set[str], op: str) -> str:
    if "mv_attention" in flags and op in ("sdpa", "matmul"):
        return "mv_attention"
    if any(part.endswith("_mv") for part in scope.split(".")):  # to_{q,k,v}_mv, to_out_mv.0
        return "mv_proj"
    return "unet_base"


@contextlib.contextmanager
def mark_row_attention(counter: FlopCounter):
    """Flag the row-wise MV SDPA while it runs (the processor calls the module-level function)."""
    from mvz.models import attention as attn_mod

    original = attn_mod.row_multiview_attention

    def wrapped(*args, **kwargs):
        with counter.flag("mv_attention"):
            return original(*args, **kwargs)

    attn_mod.row_multiview_attention = wrapped
    try:
        yield
    finally:
        attn_mod.row_multiview_attention = original


# ---- counting the model ------------------------------------------------------------------------------


@dataclass
class ComputeCount:
    """FLOPs of one benchmark job's pieces at its shapes (``rows`` = prompts × views per UNet call)."""

    height: int
    width: int
    rows: int
    unet_base_per_call: int = 0
    mv_proj_per_call: int = 0
    mv_attention_per_call: int = 0
    camera_adapter: int = 0  # once per camera set (V rows)
    vae_decode_per_image: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def unet_per_call(self) -> int:
        return self.unet_base_per_call + self.mv_proj_per_call + self.mv_attention_per_call

    def job(self, steps: int) -> dict[str, int]:
        return {
            "unet": steps * self.unet_per_call,
            "unet_base": steps * self.unet_base_per_call,
            "mv_branch": steps * (self.mv_proj_per_call + self.mv_attention_per_call),
            "vae_decode": self.rows * self.vae_decode_per_image,
        }

    def as_dict(self, steps: int) -> dict:
        per_row = self.unet_per_call / max(self.rows, 1)
        return {
            "height": self.height,
            "width": self.width,
            "rows_per_unet_call": self.rows,
            "unet_per_call": self.unet_per_call,
            "unet_base_per_call": self.unet_base_per_call,
            "mv_proj_per_call": self.mv_proj_per_call,
            "mv_attention_per_call": self.mv_attention_per_call,
            "unet_per_view": per_row,
            "unet_base_per_view": self.unet_base_per_call / max(self.rows, 1),
            "camera_adapter": self.camera_adapter,
            "vae_decode_per_image": self.vae_decode_per_image,
            "job": self.job(steps),
            "job_total": sum(v for k, v in self.job(steps).items() if k in ("unet", "vae_decode")),
            "notes": self.notes,
        }


def _meta_unet(unet_config: dict):
    from diffusers import UNet2DConditionModel

    from mvz.models.attention import install_mv_processors

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    install_mv_processors(unet, init_from_base=False)
    return unet


def count_unet(unet_config: dict, rows: int, num_views: int, latent_h: int, latent_w: int,
               vae_scale_factor: int = 8) -> dict[str, int]:
    """{unet_base, mv_proj, mv_attention} FLOPs of one UNet call on ``rows`` latents (meta device), fed by
    the UNet's graph I/O spec (``mvz.artifacts.graphs.UNetIO``): the call every backend makes.

    The camera residuals are only added inside the UNet (no multiply-adds), so they cost nothing here.
    """
    from mvz.artifacts.graphs import IOShape, UNetIO
    from mvz.models.attention import MVSettings

    cfg = dict(unet_config)
    unet = _meta_unet(cfg)
    spec = UNetIO.from_config(cfg, vae_scale_factor)
    shape = IOShape(rows, latent_h * vae_scale_factor, latent_w * vae_scale_factor)
    feeds = spec.empty_inputs(shape, "float32", device="meta")
    counter = FlopCounter(unet_category).attach(unet)
    try:
        with mark_row_attention(counter), counter, torch.no_grad():
            spec.call_unet(unet, feeds, MVSettings(num_views, latent_h, latent_w))
    finally:
        counter.detach()
    return {k: int(counter.counts.get(k, 0)) for k in ("unet_base", "mv_proj", "mv_attention")}


def count_camera_adapter(unet_config, vae_scale_factor: int, num_views: int, height: int, width: int) -> int:
    """FLOPs of the T2I camera adapter on one camera set (V pixel-resolution Plücker maps)."""
    from types import SimpleNamespace

    from mvz.models.adapter import build_camera_adapter

    cfg = SimpleNamespace(block_out_channels=list(unet_config["block_out_channels"]))
    with torch.device("meta"):
        adapter = build_camera_adapter(cfg, vae_scale_factor=vae_scale_factor)
        counter = FlopCounter()
        with counter, torch.no_grad():
            adapter(torch.empty(num_views, 6, height, width))
    return int(counter.counts.get("total", 0))


def count_vae_decoder(vae_config: dict, latent_h: int, latent_w: int) -> int:
    """FLOPs to decode one latent (post_quant_conv + decoder) on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(vae_config))
        counter = FlopCounter()
        with counter, torch.no_grad():
            vae.decode(torch.empty(1, vae_config.get("latent_channels", 4), latent_h, latent_w), return_dict=False)
    return int(counter.counts.get("total", 0))


def count_model(model, height: int, width: int, num_views: int, batch: int = 1) -> ComputeCount:
    """Count the loaded model's pieces at the benchmark's shapes (configs only; weights untouched)."""
    f = model.vae_scale_factor
    lh, lw = height // f, width // f
    rows = batch * num_views
    cc = ComputeCount(height=height, width=width, rows=rows)
    unet_cfg = dict(model.unet.config)
    u = count_unet(unet_cfg, rows, num_views, lh, lw, vae_scale_factor=f)
    cc.unet_base_per_call, cc.mv_proj_per_call, cc.mv_attention_per_call = u["unet_base"], u["mv_proj"], u["mv_attention"]
    cc.vae_decode_per_image = count_vae_decoder(dict(model.vae.config), lh, lw)
    try:
        cc.camera_adapter = count_camera_adapter(unet_cfg, f, num_views, height, width)
    except Exception as exc:  # informative only: never let it stop a benchmark
        cc.notes.append(f"camera adapter not counted: {type(exc).__name__}: {exc}")
    if getattr(model.info, "lora", None):
        cc.notes.append("LoRA layers (unfused) not counted; a fused export costs the same as the base")
    return cc


def floor_seconds(flops: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or peak_tflops <= 0:
        return None
    return flops / (peak_tflops * 1e12)


def achieved_fraction(flops: float, seconds: float | None, peak_tflops: float | None) -> float | None:
    """Achieved throughput over peak: (flops / seconds) / peak."""
    if not seconds or not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
