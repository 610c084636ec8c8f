"""The record of one generated view set: what ``mvz generate`` writes as its JSON sidecar and what ``mvz serve``
returns as metadata. One place, so the two never drift apart."""

from __future__ import annotations

from typing import Any


def generation_record(*, prompt: str, seed: int, steps: int, guidance: float, zmv: bool, zmv_steps: int, result,
                      azimuths, elevation: float, resolution: int, model_info, lora: str | None,
                      lora_scale: float | None, backend: dict, device, dtype, load_s: float, prompts_in_call: int,
                      grid: str | None = None) -> dict[str, Any]:
    """Fields of one prompt's output. ``result`` is the pipeline's sample result (``nfe``, ``timings``);
    ``grid`` (the written file) is left out when nothing is written."""
    record: dict[str, Any] = {"prompt": prompt, "seed": seed}
    if grid is not None:
        record["grid"] = grid
    record.update({
        "steps": steps,
        "guidance": guidance,
        "zmv": zmv,
        "zmv_steps": zmv_steps if zmv else 0,
        "nfe": result.nfe,
        "views": [{"azimuth": a, "elevation": elevation} for a in azimuths],
        "resolution": resolution,
        "model": model_info.name,
        "model_sources": model_info.sources,
        "random_weights": model_info.random_weights,
        "lora": lora,
        "lora_scale": lora_scale if lora else None,
        "backend": backend,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "timings": {"load_s": round(load_s, 4), **{k: round(v, 4) for k, v in result.timings.items()},
                    "prompts_in_call": prompts_in_call},
    })
    return record
