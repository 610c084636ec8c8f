"""What every backend hands to the pipeline: a Denoiser, a Decoder, a name and a description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mvz.artifacts.graphs import UNetIO, VAEDecoderIO
from mvz.artifacts.manifest import (
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
    stream: Any = None  # the torch.cuda.Stream the backend computes on (None: the caller's); benchmarks time on it
    keep_alive: list[Any] = field(default_factory=list)  # device buffers the backend's engines point into


def load_checked_export(
    folder: str | Path, model, *, num_views: int, height: int, width: int, batch: int, graphs: list[str] | None = None,
    check_lora: bool = True,
) -> ExportManifest:
    """Read an export folder's manifest and refuse it unless it fits the model (weights, and LoRA and scale
    unless ``check_lora`` is off: TensorRT may switch it by refit) and the request (views, resolution,
    batch); check that the graph files are complete."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kwargs: dict[str, Any] = {"num_views": num_views, "height": height, "width": width, "batch": batch}
    if model is not None:
        kwargs["model_fp"] = model_fingerprint(model)
        if check_lora:
            kwargs["lora"] = model_lora_identity(model)
    check_request(manifest, folder=folder, **kwargs)
    verify_graph_files(folder, manifest, graphs or ["unet", "vae_decoder"])
    return manifest


def model_lora_identity(model) -> dict[str, Any] | None:
    """The LoRA a loaded model carries (file sha256 and scale), or None."""
    return lora_identity(model.info.lora, model.info.lora_scale) if model.info.lora else None


def same_lora(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two LoRA identities (manifest form) are the same file at the same scale."""
    if a is None or b is None:
        return a is None and b is None
    return a.get("sha256") == b.get("sha256") and abs(float(a.get("scale", 1.0)) - float(b.get("scale", 1.0))) <= 1e-6


def run_in_chunks(fn, batched: list[torch.Tensor], per_call: int | None, group: int) -> torch.Tensor:
    """``fn(rows)`` over ``batched`` (tensors sharing their leading row axis) in calls of the graph's static
    row count ``per_call`` (None: any count, one call). A short last call is padded with copies of its last
    ``group`` rows (one whole prompt: its views stay together), so a static graph serves fewer prompts than
    it was exported for; the padded rows are dropped from the result and never touch the real ones (every
    op of the UNet and VAE is per row, the multiview attention per group of ``group`` rows)."""
    total = int(batched[0].shape[0])
    if per_call is None or total == per_call:
        return fn(batched)
    if total % group or per_call % group:
        from mvz.errors import ManifestMismatchError

        raise ManifestMismatchError(
            f"the graph takes {per_call} rows per call but got {total} (not whole prompts of {group} views).",
            "Re-export with the batch and views you generate with (mvz export --batch B --views V --force).",
        )
    outs = []
    for start in range(0, total, per_call):
        chunk = [t[start:start + per_call] for t in batched]
        n = int(chunk[0].shape[0])
        if n < per_call:
            reps = (per_call - n) // group
            chunk = [torch.cat([c, c[-group:].repeat(reps, *([1] * (c.dim() - 1)))]) for c in chunk]
        outs.append(fn(chunk)[:n])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class GraphDenoiser:
    """The Denoiser contract over an exported UNet graph (ONNX Runtime session or TensorRT engine).

    ``graph`` has ``rows`` (static rows per call, or None) and ``run({input name: tensor}) -> tensor``;
    inputs are passed by name (``mvz.artifacts.graphs.UNetIO``), so a graph or engine that orders or prunes
    its inputs differently still gets the right tensors."""

    def __init__(self, graph, num_views: int, name: str):
        self.graph = graph
        self.num_views = num_views
        self.name = name

    def __call__(self, sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond, cam_0, cam_1, cam_2, cam_3):
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(1)
        names = [n for n in UNetIO.input_names if n != "timestep"]

        def run(rows: list[torch.Tensor]) -> torch.Tensor:
            return self.graph.run({"timestep": t, **dict(zip(names, rows, strict=True))})

        batched = [sample, prompt_embeds, text_embeds, time_ids, timestep_cond, cam_0, cam_1, cam_2, cam_3]
        eps = run_in_chunks(run, batched, self.graph.rows, self.num_views)
        return eps.to(device=sample.device, dtype=sample.dtype)


class GraphDecoder:
    """The Decoder contract over an exported VAE decoder graph: ``images[N,3,H,W]`` float32 in [0, 1]."""

    def __init__(self, graph, name: str):
        self.graph = graph
        self.name = name

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        (name,) = VAEDecoderIO.input_names
        images = run_in_chunks(lambda rows: self.graph.run({name: rows[0]}), [latents], self.graph.rows, 1)
        return images.float().to(latents.device)
