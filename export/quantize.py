"""Quantized UNet (INT8 SmoothQuant, FP8) through NVIDIA ModelOpt: decide, calibrate, save/restore, export Q/DQ.

The flow (the LoRA is already fused into ``unet``: a quantized engine cannot be refit, so a new LoRA means a
new calibration):

1. **Decide** which layers are quantized: every ``nn.Linear`` / ``nn.Conv2d`` of the UNet except those a
   :data:`KEEP_HIGH_PRECISION` rule keeps in the base precision (fp16 on a GPU, fp32 on the CPU). The rules
   are data, each with its reason; :func:`quantized_layers` applies them, and the ModelOpt config enables the
   quantizers of exactly those layers (everything else disabled), so the decision, the config and the ONNX
   Q/DQ nodes are one list.
2. **Calibrate** by running the real sampler (``mvz.pipeline.MultiviewPipeline``, LCM policy steps, the export's
   views and resolution) over a prompt set, with the UNet in ModelOpt's calibration mode
   (``mtq.quantize(unet, config, forward_loop)``). INT8 uses ModelOpt's SmoothQuant preset (alpha 0.8, as
   NVIDIA's demo/Diffusion does for SDXL); FP8 (E4M3) its max calibration preset.
3. **Save/restore** the calibrated model with ``mto.save`` / ``mto.restore`` under
   ``$MVZ_HOME/calibration/<hash>.pth``, keyed by :func:`calibration_hash` (model weights + LoRA, precision,
   decision, prompts, steps, seed, views, resolution, base dtype, ModelOpt version), so re-exports skip it.
4. **Export** with ``torch.onnx.export(dynamo=False)``: ModelOpt's quantizers emit ONNX
   ``QuantizeLinear``/``DequantizeLinear`` pairs (INT8) or ``trt::TRT_FP8{Quantize,Dequantize}Linear``
   custom ops (FP8), which :func:`standard_fp8_qdq` rewrites into standard opset-19 ``QuantizeLinear`` /
   ``DequantizeLinear`` with a ``float8e4m3fn`` zero point (what TensorRT's parser and ONNX Runtime read).

What stays in the base precision, and why (NVIDIA's demo/Diffusion keeps the same set for SDXL: time/text
embeddings, first/last convs, residual shortcuts, transformer ``proj_out``):
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mvz.errors import DeviceError, InputError

QUANT_PRECISIONS = ("int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada (RTX 4090) and Hopper have FP8 tensor cores
SMOOTHQUANT_ALPHA = 0.8  # NVIDIA demo/Diffusion's SDXL INT8 default
DEFAULT_CALIB_STEPS = 8
DEFAULT_CALIB_SEED = 1234
CALIB_PROMPTS_FILE = "calib_prompts.txt"  # package data (mvz/data)
QUANTIZABLE = (nn.Linear, nn.Conv2d)
# ModelOpt's ``trt_high_precision_dtype`` per base dtype: the type of the Q/DQ scales and of DequantizeLinear's
# output. ModelOpt defaults to "Float", which casts every quantized input to fp32 and so turns all later
# activations and the output of an fp16 graph into fp32 (NVIDIA's diffusers example sets "Half" for fp16).
HIGH_PRECISION_DTYPE = {"fp16": "Half", "bf16": "BFloat16", "fp32": "Float"}


@dataclass(frozen=True)
class KeepRule:
    pattern: str  # fnmatch on the module path inside the UNet
    reason: str


KEEP_HIGH_PRECISION: tuple[KeepRule, ...] = (
    KeepRule("conv_in", "first conv: raw latents, 4 input channels, tiny compute, sets the error floor"),
    KeepRule("conv_out", "last conv: its output is eps itself; error here goes straight into every step"),
    KeepRule("time_embedding.*", "timestep embedding MLP: one row per call, no speed to gain, step-critical"),
    KeepRule("add_embedding.*", "text-embeds/time-ids embedding MLP: one row per call, conditioning-critical"),
    KeepRule("*.time_emb_proj", "per-resnet timestep projection: one row per call"),
    KeepRule("*_mv*", "multiview branch (to_q_mv/to_k_mv/to_v_mv/to_out_mv): cross-view consistency; "
                      "its row attention is a custom processor TensorRT does not fuse as fMHA anyway"),
    KeepRule("*.conv_shortcut", "1x1 residual shortcuts: carry the skip signal, little compute"),
    KeepRule("*.proj_out", "transformer output projection back into the residual stream (NVIDIA demo keeps it)"),
    # NVIDIA's SDXL recipe ("quant level 2.5" of Model-Optimizer's diffusers example): of the Linear layers
    # only to_q/to_k/to_v and the feed-forward (ff.net) are quantized, every Conv2d but the kept ones
    KeepRule("*.to_out.*", "attention output projection: outside NVIDIA's level 2.5 (only to_q/to_k/to_v, ff.net)"),
    KeepRule("*.proj_in", "transformer input projection: outside NVIDIA's level 2.5 (only to_q/to_k/to_v, ff.net)"),
)
# Attention itself (QK^T, softmax, AV) is never quantized: no bmm/softmax quantizer is enabled, so the
# matmuls and the softmax stay in the base precision. The camera adapter runs outside the UNet graph (its
# residuals are graph inputs), so the camera path is never quantized either.

__doc__ += "\n" + "\n".join(f"* ``{r.pattern}``: {r.reason}" for r in KEEP_HIGH_PRECISION) + (
    "\n* attention QK^T / softmax / AV: no bmm or softmax quantizer is enabled"
    "\n* the camera adapter: outside the graph (its residuals are inputs)\n")


def kept_reason(name: str) -> str | None:
    """Why the layer at module path ``name`` stays in the base precision, or None if it is quantized."""
    for rule in KEEP_HIGH_PRECISION:
        if fnmatch.fnmatchcase(name, rule.pattern):
            return rule.reason
    return None


def quantized_layers(unet: nn.Module) -> list[str]:
    """Module paths of the layers the decision quantizes (weights and inputs), in module order."""
    return [n for n, m in unet.named_modules() if isinstance(m, QUANTIZABLE) and kept_reason(n) is None]


def kept_layers(unet: nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, QUANTIZABLE) and kept_reason(n) is not None]


# ---- input checks ---------------------------------------------------------------------------------------

def check_precision_for_device(precision: str, device: torch.device | str, build_engines: bool) -> None:
    """FP8 needs compute capability 8.9+ to build or run; ONNX-only FP8 exports are allowed anywhere."""
    if precision != "fp8":
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        if tuple(cap) < FP8_MIN_CAPABILITY:
            raise DeviceError(
                f"--precision fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is "
                f"{cap[0]}.{cap[1]}.", "Use --precision int8 (or fp16) on this GPU.")
    elif build_engines:
        raise DeviceError("--precision fp8 TensorRT engines need a GPU of compute capability 8.9+; none is in use.",
                          "Add --onnx-only to write the FP8 ONNX here and build on an Ada/Hopper GPU.")


def default_calib_prompts_path() -> Path:
    from importlib.resources import files

    return Path(str(files("mvz").joinpath("data", CALIB_PROMPTS_FILE)))


def load_calib_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The calibration prompts (default: the shipped list). Missing or empty file: one-line InputError."""
    from mvz.prompts import read_prompt_file

    p = Path(path) if path is not None else default_calib_prompts_path()
    if path is not None and not p.is_file():
        raise InputError(f"--calib-prompts {p} does not exist.", "Pass a text file with one prompt per line.")
    try:
        prompts = read_prompt_file(p)
    except InputError as err:
        raise InputError(f"calibration set: {err.what}", "Write one prompt per line (at least one).") from None
    return prompts[:limit] if limit else prompts


# ---- the calibration recipe -----------------------------------------------------------------------------

@dataclass
class CalibrationSpec:
    """Everything that determines the calibrated model (hashed into the cache key)."""

    precision: str
    prompts: list[str]
    steps: int = DEFAULT_CALIB_STEPS
    seed: int = DEFAULT_CALIB_SEED
    num_views: int = 6
    height: int = 768
    width: int = 768
    base_dtype: str = "fp16"  # the precision of everything not quantized

    def validate(self) -> None:
        if self.precision not in QUANT_PRECISIONS:
            raise InputError(f"quantized precision must be int8 or fp8, got {self.precision!r}.")
        if not self.prompts:
            raise InputError("the calibration set is empty.", "Pass --calib-prompts FILE with at least one prompt.")
        if self.steps < 1:
            raise InputError(f"--calib-steps must be at least 1, got {self.steps}.")


def modelopt_version() -> str:
    import modelopt

    return str(getattr(modelopt, "__version__", "?"))


def prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def calibration_hash(spec: CalibrationSpec, model_fp: str, lora: dict | None, layers: Sequence[str]) -> str:
    """Cache key of a calibrated UNet: same key, same quantizer scales."""
    payload = {"spec": asdict(spec), "model": model_fp, "lora": (lora or {}).get("sha256"),
               "lora_scale": (lora or {}).get("scale"), "layers": list(layers), "modelopt": modelopt_version(),
               "alpha": SMOOTHQUANT_ALPHA if spec.precision == "int8" else None,
               "qdq_dtype": HIGH_PRECISION_DTYPE[spec.base_dtype]}  # restored calibrations carry it
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def calibration_dir() -> Path:
    from mvz.paths import mvz_home

    return mvz_home() / "calibration"


def modelopt_config(precision: str, layers: Sequence[str], base_dtype: str) -> dict[str, Any]:
    """ModelOpt config enabling the weight and input quantizers of ``layers`` only. The quantizer formats
    come from ModelOpt's own presets (``INT8_SMOOTHQUANT_CFG``: int8 per-channel weights, per-tensor
    activations; ``FP8_DEFAULT_CFG``: E4M3 per-tensor); the Q/DQ pairs stay in ``base_dtype``."""
    import modelopt.torch.quantization as mtq

    preset = mtq.INT8_SMOOTHQUANT_CFG if precision == "int8" else mtq.FP8_DEFAULT_CFG
    fmt = {e["quantizer_name"]: e["cfg"] for e in preset["quant_cfg"]
           if e.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer") and "cfg" in e}
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name in layers:
        for q in ("weight_quantizer", "input_quantizer"):
            cfg = {**fmt[f"*{q}"], "trt_high_precision_dtype": HIGH_PRECISION_DTYPE[base_dtype]}
            entries.append({"quantizer_name": f"{name}.{q}", "cfg": cfg, "enable": True})
    algorithm: Any = {"method": "smoothquant", "alpha": SMOOTHQUANT_ALPHA} if precision == "int8" else "max"
    return {"quant_cfg": entries, "algorithm": algorithm}


@dataclass
class CalibrationResult:
    unet: nn.Module  # quantized (ModelOpt fake-quant modules, calibrated)
    hash: str
    reused: bool
    figures: dict[str, Any] = field(default_factory=dict)


class CountingDenoiser(nn.Module):
    """The Denoiser contract over a UNet wrapper, counting UNet calls (calibration figures, and the tests'
    proof that a re-export did not calibrate again)."""

    def __init__(self, wrapper: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.wrapper = wrapper
        self.dtype = dtype
        self.calls = 0

    def forward(self, sample, timestep, *rest):
        self.calls += 1
        # the UNet's device, not the sampler's: the memory plan may keep the text encoders (so the prompt
        # embeddings) on the CPU while the UNet calibrates on the GPU
        device = next(self.wrapper.parameters()).device
        cast = [t.to(device, self.dtype) if t.is_floating_point() else t.to(device) for t in (sample, *rest)]
        return self.wrapper(cast[0], timestep.to(device), *cast[1:]).to(sample.device)


def sampler_forward_loop(model, wrapper: nn.Module, spec: CalibrationSpec) -> tuple[Callable, CountingDenoiser]:
    """ModelOpt's ``forward_loop``: the real sampler over the calibration prompts, one prompt per call (the
    export's views and resolution), seeds ``spec.seed + i``, latents only (no VAE decode)."""
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline

    counter = CountingDenoiser(wrapper, next(wrapper.parameters()).dtype)

    def forward_loop(_unet) -> None:
        pipe = MultiviewPipeline(model, denoiser=counter, num_views=spec.num_views)
        cams = CameraSet.default(spec.num_views)
        for i, prompt in enumerate(spec.prompts):
            pipe.sample([prompt], [spec.seed + i], steps=spec.steps, cameras=cams, height=spec.height,
                        width=spec.width, decode=False)

    return forward_loop, counter


def calibrated_unet(model, unet: nn.Module, spec: CalibrationSpec, *, model_fp: str, lora: dict | None,
                    cache_dir: Path | None = None, on_stage: Callable | None = None) -> CalibrationResult:
    """Quantize ``unet`` in place (a fused copy owned by the caller) per the decision, calibrated with the
    sampler, or restored from the cache when this exact calibration ran before."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq

    from export.wrappers import UNetWrapper

    spec.validate()
    layers = quantized_layers(unet)
    key = calibration_hash(spec, model_fp, lora, layers)
    cache = (cache_dir or calibration_dir()) / f"{spec.precision}-{key}.pth"
    meta_path = cache.with_suffix(".json")
    f = model.vae_scale_factor
    wrapper = UNetWrapper(unet, spec.num_views, spec.height // f, spec.width // f).eval()
    if cache.is_file() and meta_path.is_file():
        _emit(on_stage, "calibrate", "skip", reason=f"reusing the saved calibration {cache.name}")
        with contextlib.redirect_stdout(sys.stderr):
            mto.restore(unet, str(cache))
        figures = json.loads(meta_path.read_text(encoding="utf-8"))
        return CalibrationResult(unet, key, True, figures)
    _emit(on_stage, "calibrate", "start", prompts=len(spec.prompts), steps=spec.steps)
    t = time.perf_counter()
    loop, counter = sampler_forward_loop(model, wrapper, spec)
    # ModelOpt prints progress ("Inserted N quantizers") to stdout: keep stdout for `--json`
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "<layer> is not calibrated, skip smoothing" for every Conv2d
        mtq.quantize(unet, modelopt_config(spec.precision, layers, spec.base_dtype), forward_loop=loop)
    seconds = time.perf_counter() - t
    figures = {"prompts": len(spec.prompts), "prompts_sha256": prompts_hash(spec.prompts), "steps": spec.steps,
               "seed": spec.seed, "unet_calls": counter.calls, "seconds": round(seconds, 3),
               "quantized_layers": len(layers), "kept_layers": len(kept_layers(unet)),
               "algorithm": "smoothquant" if spec.precision == "int8" else "max",
               "alpha": SMOOTHQUANT_ALPHA if spec.precision == "int8" else None, "modelopt": modelopt_version()}
    _save_calibration(unet, cache, meta_path, figures)
    _emit(on_stage, "calibrate", "done", seconds=seconds, unet_calls=counter.calls)
    return CalibrationResult(unet, key, False, figures)


def _save_calibration(unet: nn.Module, cache: Path, meta_path: Path, figures: dict) -> None:
    import modelopt.torch.opt as mto

    from mvz.atomic import atomic_write, write_json

    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda p: mto.save(unet, str(p)))
    write_json(meta_path, figures)


def _emit(cb: Callable | None, stage: str, event: str, **info) -> None:
    if cb is not None:
        cb(stage, event, info)


# ---- ONNX with Q/DQ -------------------------------------------------------------------------------------

def export_quantized_graph(precision: str) -> Callable:
    """An ``export.onnx_export.export_graph`` for a ModelOpt-quantized module: TorchScript exporter only
    (ModelOpt's quantizers carry ONNX symbolics for it), then the FP8 custom ops made standard."""

    def export(module, args, path, input_names, output_names, *, exporter: str = "torchscript", **options):
        import onnx

        from export.onnx_export import export_graph

        if exporter != "torchscript":
            raise InputError(f"--precision {precision} exports with the torchscript exporter only.",
                             "Drop --exporter dynamo.")
        saved = export_graph(module, args, path, input_names, output_names, exporter="torchscript", **options)
        if precision == "fp8":
            graph = standard_fp8_qdq(onnx.load(str(path), load_external_data=True))
            saved = replace_graph(graph, Path(path), external_data=saved.external_data is not None)
        return saved

    return export


def replace_graph(model, path: Path, external_data: bool):
    """``save_graph`` over an existing ``path``: saved under the same name in a fresh folder beside it, then
    moved over the old files (data first, then the graph). onnx appends external data to an existing
    ``<name>.data``, so saving in place would leave a graph twice its size, half of it stale."""
    import os
    import shutil
    import tempfile

    from export.onnx_export import SavedGraph, save_graph

    fresh = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        saved = save_graph(model, fresh / path.name, external_data=external_data)
        data = path.parent / f"{path.name}.data"
        if saved.external_data is not None:
            os.replace(saved.external_data, data)
        else:
            data.unlink(missing_ok=True)
        os.replace(fresh / path.name, path)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return SavedGraph(path, data if saved.external_data is not None else None, saved.bytes, saved.num_nodes)


def standard_fp8_qdq(model):
    """``trt::TRT_FP8QuantizeLinear(x, s)`` / ``trt::TRT_FP8DequantizeLinear(q, s)`` -> ONNX
    ``QuantizeLinear(x, s, zp)`` / ``DequantizeLinear(q, s, zp)`` with a float8e4m3fn zero point (the
    opset-19 way to say FP8; TensorRT requires the zero point to be 0)."""
    import numpy as np
    import onnx
    from onnx import helper

    names = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}
    zp_name = "mvz_fp8_zero_point"
    changed = False
    for node in model.graph.node:
        if node.op_type in names:
            node.op_type, node.domain = names[node.op_type], ""
            del node.input[2:]
            node.input.append(zp_name)
            changed = True
    if changed:
        zp = helper.make_tensor(zp_name, onnx.TensorProto.FLOAT8E4M3FN, [], np.zeros(1, np.uint8).tobytes(), raw=True)
        model.graph.initializer.append(zp)
        for vi in list(model.graph.value_info):  # stale custom-op types (uint8): shape inference redoes them
            model.graph.value_info.remove(vi)
    keep = [op for op in model.opset_import if op.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


QDQ_CONSUMERS = ("Conv", "Gemm", "MatMul")
_PASS_THROUGH = ("Transpose", "Cast", "Reshape", "Identity")


def qdq_layers(path: str | Path, modules: set[str] | None = None) -> dict[str, dict[str, str]]:
    """What the graph quantizes, read node by node: ``{layer: {"input"|"weight": q dtype}}`` for every
    ``DequantizeLinear`` that feeds (directly or through a transpose/cast/reshape) a Conv/Gemm/MatMul. The
    layer is the module path of that compute node: TorchScript names nodes by the call scope
    (``/unet/<path>/<Op>``), and a projection that an attention processor calls (``attn.to_q`` inside
    ``processor``) gets the scope ``...attn1/processor/to_q``; given the UNet's ``modules``, such a scope
    is resolved to the module it names (``...attn1.to_q``)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, dict[str, str]] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        compute = _first_compute(node.output[0], consumers)
        if compute is None:
            continue
        layer = _resolve(_layer_of(compute.name), modules)
        role = "weight" if "weight_quantizer" in node.name else "input"
        out.setdefault(layer, {})[role] = _q_dtype(node, inits, producers, helper)
    return out


def _first_compute(tensor: str, consumers: dict, depth: int = 3):
    for c in consumers.get(tensor, []):
        if c.op_type in QDQ_CONSUMERS:
            return c
        if c.op_type in _PASS_THROUGH and depth > 0:
            found = _first_compute(c.output[0], consumers, depth - 1)
            if found is not None:
                return found
    return None


def _layer_of(node_name: str) -> str:
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "unet":
        parts = parts[1:]
    return ".".join(parts[:-1])


def _resolve(scope: str, modules: set[str] | None) -> str:
    if modules is None or scope in modules:
        return scope
    parts = scope.split(".")
    for i in range(len(parts) - 1, -1, -1):  # drop the innermost caller scope that is not the owner
        if parts[i] == "processor":
            candidate = ".".join(parts[:i] + parts[i + 1:])
            if candidate in modules:
                return candidate
    return scope


def _q_dtype(dq, inits, producers, helper) -> str:
    """The quantized type of a DequantizeLinear input: its zero point's type, or that of its data."""
    if len(dq.input) > 2 and dq.input[2] in inits:
        return str(helper.tensor_dtype_to_np_dtype(inits[dq.input[2]].data_type))
    if len(dq.input) > 2 and dq.input[2] in producers:
        p = producers[dq.input[2]]
        for a in p.attribute:
            if a.name == "to":
                return str(helper.tensor_dtype_to_np_dtype(a.i))
            if a.name == "value":
                return str(helper.tensor_dtype_to_np_dtype(a.t.data_type))
    if dq.input[0] in inits:
        return str(helper.tensor_dtype_to_np_dtype(inits[dq.input[0]].data_type))
    return "?"


def quantization_record(precision: str, spec: CalibrationSpec, result: CalibrationResult,
                        calib_prompts_path: str | None) -> dict[str, Any]:
    """The manifest's ``quantization`` entry."""
    return {"precision": precision, "base_dtype": spec.base_dtype, "calibration_hash": result.hash,
            "calibration_prompts": calib_prompts_path or f"(default) {CALIB_PROMPTS_FILE}",
            "calibration_prompts_sha256": prompts_hash(spec.prompts), "calibration_reused": result.reused,
            "calibration": result.figures, "keep_high_precision": [asdict(r) for r in KEEP_HIGH_PRECISION],
            "refit": "refused: a quantized engine is calibrated for its fused weights; a new LoRA needs a new "
                     "calibration (mvz export --precision P --lora FILE)"}
