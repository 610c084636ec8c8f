"""Switch the LoRA of a built UNet engine by refit: all or nothing, or :class:`RefitRefusedError`.

The plan (``mvz.artifacts.refit_plan.plan_refit``, pure) names every weight the switch changes, or refuses.
Here each new weight is fused one at a time from the model's PEFT layers (``mvz.models.lora.fused_weight``:
no copy of the UNet), cast to the refitter's prototype dtype, and sent by name; every ``set_named_weights`` result is
checked, weights TensorRT still asks for (``get_missing_weights``: e.g. a bias fused with a target) are read
alone from the export's ONNX, and ``refit_cuda_engine`` must succeed. Only the changed weights are sent.

A refused refit raises; the caller leaves the ``except`` block (releasing the engine and the refitter) and
rebuilds. The refit runs before the engine's first call, so no CUDA graph holds the old weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engines.tensorrt_common import check_inputs
from mvz.artifacts.compare import compare, within
from mvz.artifacts.graphs import UNetIO
from mvz.artifacts.refit_plan import (
    RefitRefusedError,
    changed_by_switch,
    plan_refit,
    read_initializers,
    target_array,
)

REBUILD = "The engine is rebuilt for this LoRA (mvz export --lora FILE --out DIR)."


def _np_dtype(trt, dt):
    import numpy as np

    try:
        return np.dtype(trt.nptype(dt))
    except TypeError:
        raise RefitRefusedError(f"the engine stores a weight as {dt}, which has no numpy type.", REBUILD) from None


def refit_unet(engine, trt, logger, refit_map: dict[str, Any], model, engine_has_lora: bool, onnx_path: Path) -> dict:
    """Refit ``engine`` (an ``ICudaEngine``) so its weights are the model's base weights with the model's
    current LoRA (or none). Returns figures for the backend's info; raises :class:`RefitRefusedError`."""
    import torch

    from mvz.models.lora import fused_weight, peft_lora_modules

    t0 = time.perf_counter()
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    targets = plan_refit(refit_map, changed_by_switch(refit_map, engine_has_lora, peft_lora_modules(model.unet)),
                         refittable=refittable)
    if not targets:
        return {"weights": 0, "seconds": 0.0}
    keep = []  # host arrays must outlive refit_cuda_engine
    with torch.no_grad():
        for t in targets:
            proto = refitter.get_weights_prototype(t.onnx_name)
            arr = target_array(t, fused_weight(model.unet, t.torch_name.removesuffix(".weight")).cpu(),
                               _np_dtype(trt, proto.dtype))
            if arr.size != proto.size:
                raise RefitRefusedError(f"{t.onnx_name}: {arr.size} values, the engine holds {proto.size}.", REBUILD)
            keep.append(arr)
            if not refitter.set_named_weights(t.onnx_name, trt.Weights(arr), trt.TensorLocation.HOST):
                raise RefitRefusedError(f"TensorRT refused the weight {t.onnx_name}.", REBUILD)
    extra = [n for n in refitter.get_missing_weights() if n]
    if extra:  # weights refitted together with a target (same layer): their export values, read alone
        for name, arr in read_initializers(onnx_path, extra).items():
            arr = arr.astype(_np_dtype(trt, refitter.get_weights_prototype(name).dtype), copy=False)
            keep.append(arr)
            if not refitter.set_named_weights(name, trt.Weights(arr), trt.TensorLocation.HOST):
                raise RefitRefusedError(f"TensorRT refused the weight {name}.", REBUILD)
    still = [n for n in refitter.get_missing_weights() if n]
    if still:
        raise RefitRefusedError(f"TensorRT still misses {len(still)} weights (e.g. {still[0]}).", REBUILD)
    if not refitter.refit_cuda_engine():
        raise RefitRefusedError("TensorRT could not refit the engine (its weights are now undefined).", REBUILD)
    return {"weights": len(targets), "extra_weights": len(extra), "seconds": time.perf_counter() - t0}


# engine after refit vs the torch UNet carrying the LoRA: (max rel, median rel, min cosine), as export parity
REFIT_CHECK_TOLERANCE = {"fp16": (1e-1, 1e-2, 0.999), "fp32": (1e-2, 1e-3, 0.99999)}
# and the 99th percentile of the same relative error (a LoRA refit that corrupts a few channels)
REFIT_P99_TOLERANCE = {"fp16": 3e-2, "fp32": 3e-3}


def check_refit(run, model, manifest) -> dict:
    """One comparison of the refitted UNet engine (``run({input: tensor}) -> eps``) with the model's torch
    UNet (LoRA attached) on the fixed check input, with a NaN/inf check; a failure is a refusal (rebuild)."""
    import torch

    from mvz.models.attention import MVSettings

    dev = model.device
    feeds = {k: torch.from_numpy(v).to(dev) for k, v in check_inputs(manifest, "unet").items()}
    f = model.vae_scale_factor
    settings = MVSettings(manifest.num_views, manifest.height // f, manifest.width // f)
    with torch.inference_mode():
        torch_feeds = {n: t if n == "timestep" else t.to(model.dtype) for n, t in feeds.items()}
        ref = UNetIO.of(model).call_unet(model.unet, torch_feeds, settings)
        out = run(feeds)
    ref_np, out_np = ref.float().cpu().numpy(), out.float().cpu().numpy()
    stats = compare(ref_np, out_np)
    stats["p99_rel_err"] = _p99_rel_err(ref_np, out_np)
    tol = REFIT_CHECK_TOLERANCE[manifest.precision]
    stats["passed"] = within(stats, manifest.precision, tol) and stats["p99_rel_err"] <= REFIT_P99_TOLERANCE[manifest.precision]
    if not stats["passed"]:
        raise RefitRefusedError(
            f"the refitted UNet engine does not match the torch UNet with this LoRA (finite={stats['finite']}, "
            f"median rel err {stats['median_rel_err']:.3g}, p99 rel err {stats['p99_rel_err']:.3g}, "
            f"cosine {stats['cosine']:.5f}).", REBUILD)
    return stats


def _p99_rel_err(ref, out) -> float:
    """99th percentile of |out - ref| / rms(ref) (the relative error ``compare`` reports as median and max)."""
    import numpy as np

    ref, out = np.asarray(ref, np.float64).ravel(), np.asarray(out, np.float64).ravel()
    rms = float(np.sqrt(np.mean(ref**2))) or 1.0
    return float(np.quantile(np.abs(out - ref) / rms, 0.99)) if ref.size else 0.0
