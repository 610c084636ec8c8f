"""What every backend hands to the pipeline: a Denoiser, a Decoder, a name and a description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.manifest import (
    ExportManifest,
    check_request,
    lora_identity,
    model_fingerprint,
    read_manifest,
    verify_graph_files,
)


@dataclass
class Backend:
    name: str
    denoiser: Any  # mvz.pipeline.Denoiser
    decoder: Any  # mvz.pipeline.Decoder
    info: dict[str, Any] = field(default_factory=dict)


def load_checked_export(
    folder: str | Path, model, *, num_views: int, height: int, width: int, batch: int, graphs: list[str] | None = None
) -> ExportManifest:
    """Read an export folder's manifest and refuse it unless it fits the model (weights, LoRA and scale)
    and the request (views, resolution, batch); check that the graph files are complete."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kwargs: dict[str, Any] = {"num_views": num_views, "height": height, "width": width, "batch": batch}
    if model is not None:
        kwargs["model_fp"] = model_fingerprint(model)
        kwargs["lora"] = lora_identity(model.info.lora, model.info.lora_scale) if model.info.lora else None
    check_request(manifest, folder=folder, **kwargs)
    verify_graph_files(folder, manifest, graphs or ["unet", "vae_decoder"])
    return manifest


def rows_chunks(total: int, per_call: int | None) -> list[slice]:
    """Split ``total`` rows into calls of the graph's static row count (whole prompts: views stay together)."""
    if per_call is None or total == per_call:
        return [slice(0, total)]
    if total % per_call:
        from mvz.errors import ManifestMismatchError

        raise ManifestMismatchError(
            f"the graph takes {per_call} rows per call but got {total} (not a multiple).",
            "Re-export with the batch and views you generate with (mvz export --batch B --views V --force).",
        )
    return [slice(i, i + per_call) for i in range(0, total, per_call)]


def to_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
