"""The refit plan: which engine weights a LoRA switch sets, all or nothing (pure; read by engines).

The exporter writes ``refit_map.json`` (``export.refit_map.build_refit_map``): every LoRA-target weight of
the UNet -> its ONNX initializer (= TensorRT weight) name, whether the exporter transposed it, its shape, and
the weights that share an initializer (``shared``) or were not found (``unmapped``). The runtime
(``engines.tensorrt_refit``) turns that map and the LoRA modules of a switch into a plan here, or a
:class:`RefitRefusedError` that makes the session rebuild the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvz.errors import ManifestMismatchError

REFIT_MAP_NAME = "refit_map.json"


def host_array(t: torch.Tensor) -> np.ndarray:
    """A tensor as a contiguous numpy array on the host (no grad)."""
    return t.detach().cpu().contiguous().numpy()


def read_refit_map(export_dir: str | Path, refit_map_name: str | None) -> dict[str, Any]:
    """The refit map of an export folder (``manifest.refit_map``), or :class:`RefitRefusedError` when the
    export has none (quantized, or made before refit maps)."""
    path = Path(export_dir) / (refit_map_name or REFIT_MAP_NAME)
    if not path.is_file():
        raise RefitRefusedError(f"the export {export_dir} has no refit map ({path.name}).",
                                "The engines are rebuilt for this LoRA (re-export to get a refit map).")
    return json.loads(path.read_text())


class RefitRefusedError(ManifestMismatchError):
    """A LoRA switch by refit cannot set every weight the LoRA changes: the engine must be rebuilt."""


@dataclass(frozen=True)
class RefitTarget:
    torch_name: str  # ``<module>.weight`` in the UNet
    onnx_name: str  # the initializer (= TensorRT weight) name
    transposed: bool  # the initializer holds the weight transposed
    shape: tuple[int, ...]  # the initializer's shape


def changed_by_switch(refit_map: dict[str, Any], engine_has_lora: bool, new_lora_modules: list[str]) -> list[str]:
    """The UNet weights a LoRA switch changes: those of the engine's current LoRA (every LoRA target of the
    export, which ``fuse.lora_deltas`` checks a LoRA file covers) and those of the new LoRA's modules."""
    names = {f"{m}.weight" for m in new_lora_modules}
    if engine_has_lora:
        names |= set(refit_map["weights"]) | set(refit_map.get("unmapped", []))
    return sorted(names)


def plan_refit(refit_map: dict[str, Any], changed: list[str], refittable: set[str] | None = None) -> list[RefitTarget]:
    """Every weight in ``changed`` as a refit target, or :class:`RefitRefusedError` naming the weights that
    cannot be set by name (not in the map, shared with another module, or - given the engine's
    ``refittable`` weight names - not refittable in the engine). Never a partial plan: TensorRT accepts a
    partial refit silently, so a forgotten target would serve wrong weights."""
    shared = set(refit_map.get("shared", []))
    entries = refit_map["weights"]
    unmapped = [n for n in changed if n not in entries]
    ambiguous = [n for n in changed if n in shared]
    locked = [n for n in changed if n in entries and refittable is not None and entries[n]["onnx"] not in refittable]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} changed weights have no ONNX initializer in the refit map (e.g. {unmapped[0]})")
    if ambiguous:
        problems.append(f"{len(ambiguous)} share an initializer with another module (e.g. {ambiguous[0]})")
    if locked:
        problems.append(f"{len(locked)} are not refittable in the engine (e.g. {locked[0]})")
    if problems:
        raise RefitRefusedError(f"cannot switch the LoRA by refit: {'; '.join(problems)}.",
                                "The engine is rebuilt for this LoRA (mvz export --lora FILE --out DIR).")
    return [RefitTarget(n, entries[n]["onnx"], bool(entries[n]["transposed"]), tuple(entries[n]["shape"]))
            for n in sorted(changed)]


def target_array(target: RefitTarget, weight: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A UNet weight laid out as its initializer (transposed where the exporter did), cast to ``dtype`` (the
    refitter's prototype dtype), C-contiguous on the host."""
    w = weight.detach()
    arr = np.ascontiguousarray(host_array(w.T if target.transposed else w).astype(dtype, copy=False))
    if tuple(arr.shape) != target.shape:
        raise RefitRefusedError(f"weight {target.torch_name} has shape {arr.shape}, its initializer {target.shape}.",
                                "Rebuild the engine for this model (mvz export --force).")
    return arr


def read_initializers(onnx_path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Only the named initializers of a graph: the protobuf is read without external data and just these
    tensors are read from the data file (never the whole multi-GB graph)."""
    import onnx
    from onnx import numpy_helper

    onnx_path = Path(onnx_path)
    wanted = set(names)
    model = onnx.load(str(onnx_path), load_external_data=False)
    found = {i.name: i for i in model.graph.initializer if i.name in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise RefitRefusedError(f"{onnx_path} has no initializer {missing[0]} (+{len(missing) - 1} more).",
                                "Rebuild the engine from this export (mvz export --force).")
    return {n: numpy_helper.to_array(t, base_dir=str(onnx_path.parent)) for n, t in found.items()}
