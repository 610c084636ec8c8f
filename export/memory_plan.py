"""The device-memory plan of ``mvz export`` (+ engine builds) and of a TensorRT ``mvz generate``: pure arithmetic
on parameter counts, shapes and dtypes, so every figure can be checked by hand.

Per stage: **weights** (what is resident: parameters x bytes per element), **activations** (the working set
of one forward) and **workspace** (the TensorRT builder's pool limit). Activation model (an estimate, an
upper bound for what TensorRT keeps with fused attention):

* UNet, per row (one view of one prompt), at level ``l`` (latent side halved per level, ``C_l`` channels):
  the skip connections the up path needs (``conv_in`` + ``layers_per_block`` maps per level + one per
  downsampler) plus the larger of ``UNET_WORK_MAPS`` maps of the largest level in flight (resnet input,
  norm, conv, residual, the up path's concatenation) and a feed-forward's GEGLU working set at an attention
  level (``FF_WORK_CHANNELS x C_l`` channels), plus the scores of one multiview row-attention layer (heads x
  latent rows x (views x width)^2 per prompt; TensorRT may not fuse it into flash attention).
* VAE decoder, per image: ``VAE_WORK_MAPS`` maps of the largest (channels x side^2) map of the up path
  (an upsampler's output counts at its doubled side) plus the mid-block attention scores ((h w)^2).

**Host memory** (:func:`host_export_plan`): RAM per export stage beside the device plan. What the process holds
is the model as loaded (on the host when exported from the CPU), plus per stage what the route copies: the
``dynamo`` route traces on the meta device (nothing computed) and its optimizer folds the Linear weights'
transposes into new tensors (at most one copy of the UNet graph's weights); the TorchScript route runs the
module (activations, on a CPU) and holds the traced graph and its protobuf (two copies); ONNX Runtime parity
loads the graph (one copy, plus activations on a CPU). Once a graph is written nothing reads its weights but
one tensor at a time (refit map, hashes). ``HOST_OVERHEAD`` covers the interpreter and libraries.

The constants are first estimates, not yet calibrated on a GPU (``bench/gpu_check.py`` measures the real
per-stage peaks). The peak over the stages is compared with the device's free memory before anything heavy starts; a plan
that does not fit is refused in one line naming the option that lowers its peak stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mvz.errors import DeviceError

GiB = 1 << 30
DTYPE_BYTES = {"fp16": 2, "fp32": 4}
UNET_WORK_MAPS = 8
VAE_WORK_MAPS = 4
FF_WORK_CHANNELS = 12  # GEGLU: the 8C projection output plus its 4C gated product
RUNTIME_OVERHEAD = 1 << 29  # CUDA context, cuBLAS/cuDNN handles, allocator slack: 0.5 GiB per stage
HEAD_DIM = 64


@dataclass(frozen=True)
class UNetShape:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[bool, ...]  # which levels have (multiview) attention

    @classmethod
    def from_config(cls, cfg) -> UNetShape:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        lpb = get("layers_per_block", 2)
        return cls(tuple(get("block_out_channels")), int(lpb if isinstance(lpb, int) else max(lpb)),
                   tuple("CrossAttn" in t for t in get("down_block_types")))


@dataclass(frozen=True)
class VAEShape:
    block_out_channels: tuple[int, ...]  # encoder order, e.g. (128, 256, 512, 512); the decoder reverses it

    @classmethod
    def from_config(cls, cfg) -> VAEShape:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(tuple(get("block_out_channels")))


def unet_activation_bytes(shape: UNetShape, rows: int, views: int, lat_h: int, lat_w: int, dtype_bytes: int) -> int:
    """Working set of one UNet call over ``rows`` rows (``rows / views`` prompts) at a ``lat_h x lat_w`` latent."""
    levels = [(c, lat_h >> i, lat_w >> i) for i, c in enumerate(shape.block_out_channels)]
    c0, h0, w0 = levels[0]
    skips = c0 * h0 * w0  # conv_in
    for i, (c, h, w) in enumerate(levels):
        skips += shape.layers_per_block * c * h * w
        if i < len(levels) - 1:  # the downsampler's output, at the next level's side
            skips += c * (h // 2) * (w // 2)
    largest = max(c * h * w for c, h, w in levels)
    ff = max((FF_WORK_CHANNELS * c * h * w for (c, h, w), att in zip(levels, shape.attention_levels, strict=True)
              if att), default=0)
    per_row = skips + max(UNET_WORK_MAPS * largest, ff)
    prompts = max(1, rows // views)
    scores = max((max(1, c // HEAD_DIM) * h * (views * w) ** 2 for (c, h, w), att in zip(levels, shape.attention_levels, strict=True)
                  if att), default=0)
    return (rows * per_row + prompts * scores) * dtype_bytes


def vae_activation_bytes(shape: VAEShape, images: int, lat_h: int, lat_w: int, dtype_bytes: int) -> int:
    """Working set of one VAE decoder call over ``images`` latents of ``lat_h x lat_w``."""
    chans = list(reversed(shape.block_out_channels))
    largest = 0
    for i, c in enumerate(chans):
        h, w = lat_h << i, lat_w << i
        largest = max(largest, c * h * w)
        if i < len(chans) - 1:
            largest = max(largest, c * (2 * h) * (2 * w))  # the upsampler's output
    mid_scores = (lat_h * lat_w) ** 2
    return images * (VAE_WORK_MAPS * largest + mid_scores) * dtype_bytes


@dataclass
class Stage:
    name: str
    weights: int
    activations: int
    workspace: int = 0
    lower_with: str = ""  # the option that lowers this stage
    overhead: int = RUNTIME_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.workspace + self.overhead


@dataclass
class MemoryPlan:
    stages: list[Stage] = field(default_factory=list)

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)

    def rows(self) -> list[dict[str, Any]]:
        return [{"stage": s.name, "weights_gib": s.weights / GiB, "activations_gib": s.activations / GiB,
                 "workspace_gib": s.workspace / GiB, "total_gib": s.total / GiB} for s in self.stages]


@dataclass(frozen=True)
class PlanRequest:
    """What the plan depends on: parameter counts, shapes, dtypes and options (no tensors)."""

    unet_params: int
    vae_decoder_params: int
    unet_shape: UNetShape
    vae_shape: VAEShape
    views: int
    batch: int
    height: int
    width: int
    precision: str = "fp16"
    vae_precision: str = "fp32"
    workspace_bytes: int = 8 * GiB
    build_engines: bool = True
    parity: bool = True
    vae_views_per_call: int | None = None  # None: all rows in one call
    text_encoder_params: int = 0  # resident during generate (torch)
    vae_scale: int = 8

    @property
    def rows(self) -> int:
        return self.batch * self.views

    @property
    def vae_images(self) -> int:
        return min(self.rows, self.vae_views_per_call or self.rows)


def _parts(r: PlanRequest) -> tuple[int, int, int, int]:
    ub, vb = DTYPE_BYTES[r.precision], DTYPE_BYTES[r.vae_precision]
    lh, lw = r.height // r.vae_scale, r.width // r.vae_scale
    unet_w, vae_w = r.unet_params * ub, r.vae_decoder_params * vb
    return (unet_w, vae_w, unet_activation_bytes(r.unet_shape, r.rows, r.views, lh, lw, ub),
            vae_activation_bytes(r.vae_shape, r.vae_images, lh, lw, vb))


def export_plan(r: PlanRequest) -> MemoryPlan:
    """Stages of ``mvz export`` on a GPU: trace (torch), ONNX Runtime parity (the torch module already moved
    off), TensorRT build (weights + workspace + tactic activations) and the engine's check (TensorRT, then
    ONNX Runtime, one at a time). The VAE stays resident while the UNet is traced and checked."""
    unet_w, vae_w, unet_a, _ = _parts(r)
    lh, lw = r.height // r.vae_scale, r.width // r.vae_scale
    vae_a_all = vae_activation_bytes(r.vae_shape, r.rows, lh, lw, DTYPE_BYTES[r.vae_precision])
    shape_hint = "--views, --batch or --resolution"
    plan = MemoryPlan([Stage("unet: trace", unet_w + vae_w, unet_a, lower_with=shape_hint)])
    if r.parity:
        plan.stages.append(Stage("unet: parity (ONNX Runtime)", unet_w + vae_w, unet_a, lower_with="--skip-parity"))
    plan.stages.append(Stage("vae: trace", vae_w, vae_a_all, lower_with=shape_hint))
    if r.parity:
        plan.stages.append(Stage("vae: parity (ONNX Runtime)", vae_w, vae_a_all, lower_with="--skip-parity"))
    if r.build_engines:
        _, _, _, vae_a = _parts(r)
        plan.stages += [
            Stage("unet: TensorRT build", unet_w, unet_a, r.workspace_bytes, lower_with="--workspace"),
            Stage("unet: engine check", unet_w, unet_a, lower_with=shape_hint),
            Stage("vae: TensorRT build", vae_w, vae_a, r.workspace_bytes, lower_with="--workspace"),
            Stage("vae: engine check", vae_w, vae_a, lower_with=shape_hint),
        ]
    return plan


def generate_plan(r: PlanRequest) -> MemoryPlan:
    """``mvz generate --backend tensorrt``: both engines resident, one shared context buffer sized by the
    larger engine's activations, the torch text encoders (fp16)."""
    unet_w, vae_w, unet_a, vae_a = _parts(r)
    return MemoryPlan([Stage("generate: TensorRT engines", unet_w + vae_w + 2 * r.text_encoder_params,
                             max(unet_a, vae_a), lower_with="--views, --batch or --resolution")])


HOST_OVERHEAD = 3 << 29  # python, torch, onnx, onnxruntime and allocator slack: 1.5 GiB
TORCHSCRIPT_GRAPH_COPIES = 2  # the tracer's graph and its serialized protobuf, both beside the model


@dataclass(frozen=True)
class HostRequest:
    """What the host plan depends on: the model's resident bytes and the graphs' weight bytes (no tensors)."""

    plan: PlanRequest
    model_bytes: int  # every component as loaded, on the host (0 when the model lives on a GPU)
    exporter: str = "dynamo"
    on_cpu: bool = True  # the torch side (trace, parity reference) computes on the host
    copy_bytes: int = 0  # a UNet copy in the export dtype when the loaded one is in another dtype


def host_export_plan(h: HostRequest) -> MemoryPlan:
    """Host RAM per stage of ``mvz export`` (weights: the model as loaded; activations: copies and working sets)."""
    r = h.plan
    unet_w, vae_w, unet_a, _ = _parts(r)
    lh, lw = r.height // r.vae_scale, r.width // r.vae_scale
    vae_a = vae_activation_bytes(r.vae_shape, r.vae_images, lh, lw, DTYPE_BYTES[r.vae_precision])
    held = h.model_bytes + h.copy_bytes

    def stage(name: str, extra: int, lower_with: str) -> Stage:
        return Stage(name, held, extra, lower_with=lower_with, overhead=HOST_OVERHEAD)

    compute_u, compute_v = (unet_a, vae_a) if h.on_cpu else (0, 0)
    if h.exporter == "dynamo":
        trace_u, trace_v = stage("unet: trace + optimize (host)", unet_w, "--views or --resolution"), \
            stage("vae: trace + optimize (host)", vae_w, "--views or --resolution")
    else:
        ts = "--exporter dynamo"
        trace_u = stage("unet: TorchScript trace (host)", TORCHSCRIPT_GRAPH_COPIES * unet_w + compute_u, ts)
        trace_v = stage("vae: TorchScript trace (host)", TORCHSCRIPT_GRAPH_COPIES * vae_w + compute_v, ts)
    plan = MemoryPlan([stage("load model (host)", 0, "--precision fp16"), trace_u])
    if r.parity:
        plan.stages.append(stage("unet: parity (host)", unet_w + 2 * compute_u, "--skip-parity"))
    plan.stages.append(trace_v)
    if r.parity:
        plan.stages.append(stage("vae: parity (host)", vae_w + 2 * compute_v, "--skip-parity"))
    return plan


def available_host_memory() -> int:
    """Bytes the kernel can give this process now: psutil's ``available`` if installed, else MemAvailable."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def check_host_fits(plan: MemoryPlan, available_bytes: int) -> None:
    """Refuse, in one line, a host plan whose peak stage needs more than ``available_bytes``."""
    peak = plan.peak
    if peak.total > available_bytes:
        raise DeviceError(
            f"this machine has {available_bytes / GiB:.1f} GiB of memory available but {peak.name} needs about "
            f"{peak.total / GiB:.1f} GiB (model {peak.weights / GiB:.1f}, copies and working set "
            f"{peak.activations / GiB:.1f}).",
            f"Lower it with {peak.lower_with}, or close other programs (--no-memory-check skips this estimate).",
        )


def check_fits(plan: MemoryPlan, available_bytes: int, device: str = "the GPU") -> None:
    """Refuse, in one line, a plan whose peak stage needs more than ``available_bytes``."""
    peak = plan.peak
    if peak.total > available_bytes:
        raise DeviceError(
            f"{device} has {available_bytes / GiB:.1f} GiB free but {peak.name} needs about {peak.total / GiB:.1f} GiB "
            f"(weights {peak.weights / GiB:.1f}, activations {peak.activations / GiB:.1f}, workspace "
            f"{peak.workspace / GiB:.1f}).",
            f"Lower it with {peak.lower_with}, or free GPU memory (--no-memory-check skips this estimate).",
        )


def model_plan_request(model, **options) -> PlanRequest:
    """A :class:`PlanRequest` from a loaded MultiviewModel (parameter counts and configs) and the options."""
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    vae = model.vae
    dec_params = count(vae.decoder) + (count(vae.post_quant_conv) if getattr(vae, "post_quant_conv", None) is not None else 0)
    return PlanRequest(
        unet_params=count(model.unet), vae_decoder_params=dec_params, unet_shape=UNetShape.from_config(model.unet.config),
        vae_shape=VAEShape.from_config(vae.config), vae_scale=model.vae_scale_factor,
        text_encoder_params=count(model.text_encoder) + count(model.text_encoder_2), **options,
    )
