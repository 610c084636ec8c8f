"""Map the UNet's LoRA-target weights to ONNX initializer names, for TensorRT refit without a rebuild.

The exporter renames and transposes weights (a Linear becomes ``MatMul`` with a folded, transposed
``onnx::MatMul_123`` initializer), so names cannot be derived. Instead every target weight is located by
the bytes it holds in the exported precision, as itself or transposed; weights with identical bytes (the
MV branch is initialised as a copy of attn1) are told apart by the module of the node that consumes the
initializer: its name in a TorchScript graph (``/unet/down_blocks.1/.../attn1/to_q/MatMul``), its recorded
module scopes in a dynamo graph (``pkg.torch.onnx.name_scopes``). The map is built on the graph's structure,
hashing one initializer at a time from the external data file (never the whole graph in memory). A weight whose
initializer is shared with another module cannot be refitted on its own and is listed as ``shared``.

The engine's weight names are the ONNX initializer names (the TensorRT ONNX parser names them so), so the
map serves both ``Refitter.set_named_weights`` and the check of which initializers a LoRA changes.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.fuse import lora_deltas, lora_target_modules
from mvz.artifacts.refit_plan import REFIT_MAP_NAME

__all__ = ["REFIT_MAP_NAME", "build_refit_map", "lora_changed_names", "mapped_weights"]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def _scope(module_path: str) -> str:
    """``down_blocks.1.attentions.0.attn1.to_out.0`` -> ``down_blocks.1/attentions.0/attn1/to_out.0``."""
    out: list[str] = []
    for part in module_path.split("."):
        if part.isdigit() and out:
            out[-1] += "." + part
        else:
            out.append(part)
    return "/".join(out)


def _consumed_by(node, module_path: str) -> bool:
    """Whether a node belongs to the module ``module_path`` (e.g. ``a.0.b.to_q``).

    A dynamo graph records the module scopes of each node (``pkg.torch.onnx.name_scopes``: ``[..,
    'unet.a.0.b.to_q', 'linear_9']``): the innermost module is this one. A TorchScript graph names the node by
    its scope (``/unet/a.0/b/processor/to_q/MatMul``): the module's scope parts appear in order in the node's
    scope (calls through a processor add parts) and the module's own name is the node's innermost scope."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            inner = scopes[-2] if len(scopes) > 1 else ""
            return inner == module_path or inner.endswith("." + module_path)
    segs = node.name.strip("/").split("/")[:-1]
    target = _scope(module_path).split("/")
    if not segs or segs[-1] != target[-1]:
        return False
    it = iter(segs)
    return all(part in it for part in target)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _initializer_digests(onnx_path: Path, model) -> dict[str, list[str]]:
    """digest -> initializer names over the graph's 2-D initializers, each read on its own (from the external
    data file when it lives there) and dropped once hashed: one tensor in memory at a time."""
    from onnx import numpy_helper

    by_digest: dict[str, list[str]] = {}
    for init in model.graph.initializer:
        if len(init.dims) != 2:
            continue
        arr = numpy_helper.to_array(init, base_dir=str(onnx_path.parent))
        by_digest.setdefault(_digest(arr), []).append(init.name)
        del arr
    return by_digest


def build_refit_map(onnx_path: str | Path, unet: torch.nn.Module) -> dict[str, Any]:
    """``{"weights": {torch_name: {"onnx": name, "transposed": bool, "shape": [...]}}, "unmapped": [...],
    "shared": [...]}`` for every LoRA-target weight of ``unet`` (the module that was exported).

    Works on the graph's structure (loaded without external data); the 2-D initializers are hashed one at a
    time, so a multi-GB graph costs one tensor of memory, never a second copy of the weights."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    by_digest = _initializer_digests(onnx_path, model)

    return map_lora_targets(unet, by_digest, consumers)


def map_lora_targets(unet: torch.nn.Module, by_digest: dict[str, list[str]], consumers: dict[str, list]) -> dict[str, Any]:
    """The refit map from the graph's 2-D initializer digests (digest -> names) and its consumers (initializer
    name -> nodes): each LoRA-target weight matched by its bytes (or its transpose); identical bytes are told
    apart by the module path of the consuming node."""
    weights: dict[str, dict[str, Any]] = {}
    unmapped: list[str] = []
    for module_path, linear in sorted(lora_target_modules(unet).items()):
        name = f"{module_path}.weight"
        w = _np(linear.weight)
        found = None
        for transposed, arr in ((False, w), (True, w.T)):
            cands = by_digest.get(_digest(arr), [])
            if len(cands) > 1:
                cands = [c for c in cands if any(_consumed_by(n, module_path) for n in consumers.get(c, []))] or cands
            if len(cands) == 1:
                found = {"onnx": cands[0], "transposed": transposed, "shape": list(arr.shape)}
                break
        if found is None:
            unmapped.append(name)
        else:
            weights[name] = found
    owners: dict[str, list[str]] = {}
    for tname, e in weights.items():
        owners.setdefault(e["onnx"], []).append(tname)
    shared = sorted(t for ts in owners.values() if len(ts) > 1 for t in ts)
    return {"weights": weights, "unmapped": unmapped, "shared": shared}


def mapped_weights(
    refit_map: dict[str, Any], unet: torch.nn.Module, names: list[str] | None = None, dtype: np.dtype | None = None
) -> dict[str, np.ndarray]:
    """``{onnx initializer name: array}`` for the given torch weight names of ``unet`` (default: every mapped
    weight), laid out as the initializer (transposed where the exporter transposed). For a LoRA switch pass
    the UNet with the new LoRA fused (``export.fuse.fused_unet``). Raises ``KeyError`` naming weights that
    cannot be refitted by name (unmapped or shared): the engine must then be rebuilt."""
    names = sorted(refit_map["weights"]) if names is None else names
    shared = set(refit_map.get("shared", []))
    bad = [n for n in names if n not in refit_map["weights"] or n in shared]
    if bad:
        raise KeyError(f"{len(bad)} weights have no refittable initializer of their own (e.g. {bad[0]})")
    params = dict(unet.named_parameters())
    out = {}
    for name in names:
        entry = refit_map["weights"][name]
        p = params[name].detach()
        arr = _np(p.T if entry["transposed"] else p)
        out[entry["onnx"]] = arr.astype(dtype) if dtype is not None else arr
    return out


def lora_changed_names(unet: torch.nn.Module, lora_path: str | Path, scale: float = 1.0) -> list[str]:
    """The UNet weights a LoRA file changes (its target modules' weights; biases are untouched)."""
    return sorted(lora_deltas(unet, lora_path, scale))
