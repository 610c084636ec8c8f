"""LoRA fusion into the base weights: W' = W + scale · (alpha / r) · B @ A, on a copy of the UNet.

Two sources:

* a LoRA file in the upstream PEFT layout (``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight``
  (out, r)); checked strictly against the UNet's LoRA target modules (``mvz.models.lora.LORA_TARGETS``);
* a UNet that already carries PEFT LoRA layers (``load_model(..., lora=...)``): merged with PEFT's own
  ``merge()`` and unwrapped to plain ``nn.Linear`` layers.

Two ways to apply it: :func:`fused_unet` on a deep copy (its MV processors share one copied
``MVSettings``); :func:`lora_fused_in_place` in the UNet's own weights for the duration of a block, restored
bit for bit afterwards (the export: never a second UNet on the GPU). The refit fuses one weight at a time
from attached PEFT layers (``mvz.models.lora.fused_weight``: nothing copied).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mvz.models.lora import LORA_TARGETS, has_lora, read_lora_file
from mvz.state_dicts import check_state


def lora_target_modules(unet: nn.Module) -> dict[str, nn.Linear]:
    """Module path -> Linear for every module a LoRA of the upstream config targets (PEFT matches whole
    trailing name parts, so ``to_q`` does not match ``to_q_mv``)."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            out[name] = module
    return out


def _checked_lora(unet: nn.Module, lora_path: str | Path, scale: float):
    """(sorted target modules, module -> float32 delta) for a LoRA file checked strictly against the UNet."""
    sd, rank, alpha = read_lora_file(lora_path)
    alpha = float(rank if alpha is None else alpha)
    targets = lora_target_modules(unet)
    expected = {}
    for m, lin in targets.items():  # the keys and shapes a LoRA of this rank must have for this UNet
        expected[f"{m}.lora_A.weight"] = torch.empty(rank, lin.in_features, device="meta")
        expected[f"{m}.lora_B.weight"] = torch.empty(lin.out_features, rank, device="meta")
    check_state(sd, expected, f"LoRA {lora_path} (for this model)",
                "Use a LoRA trained for this model (same UNet, MV-Adapter and target modules).", noun="LoRA keys")
    factor = float(scale) * alpha / rank
    return sorted(targets), lambda m: factor * (sd[f"{m}.lora_B.weight"].float() @ sd[f"{m}.lora_A.weight"].float())


def iter_lora_deltas(unet: nn.Module, lora_path: str | Path, scale: float = 1.0) -> Iterator[tuple[str, torch.Tensor]]:
    """``('<module>.weight', delta)`` one target at a time (the file is checked first, as a whole), so fusing
    a full-size UNet never holds every float32 delta at once."""
    modules, delta = _checked_lora(unet, lora_path, scale)
    for m in modules:
        yield f"{m}.weight", delta(m)


def lora_deltas(unet: nn.Module, lora_path: str | Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``{'<module>.weight': scale · (alpha/r) · B @ A}`` in float32, checked strictly against the UNet."""
    return dict(iter_lora_deltas(unet, lora_path, scale))


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def merge_peft_layers(unet: nn.Module) -> list[str]:
    """Merge every PEFT LoRA layer of ``unet`` (in place) and unwrap it to its base layer. Returns the
    merged module paths."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = []
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        _set_submodule(unet, name, layer.get_base_layer())
        merged.append(name)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(unet, attr):
            try:
                delattr(unet, attr)
            except AttributeError:
                setattr(unet, attr, None if attr == "peft_config" else False)
    return merged


def fused_unet(
    unet: nn.Module, lora_path: str | Path | None = None, scale: float = 1.0, dtype: torch.dtype | None = None
) -> nn.Module:
    """A copy of ``unet`` with its LoRA (attached PEFT layers and/or ``lora_path``) fused into the base
    weights, in ``dtype`` (default: the UNet's). Fusion arithmetic is float32. ``unet`` is left unchanged."""
    work = copy.deepcopy(unet)
    if has_lora(work):
        orig = next(work.parameters()).dtype
        work.float()
        merge_peft_layers(work)
        work.to(orig)
    if lora_path is not None:
        params = dict(work.named_parameters())
        with torch.no_grad():
            for name, delta in iter_lora_deltas(work, lora_path, scale):
                p = params[name]
                p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
    if dtype is not None:
        work.to(dtype)
    work.eval().requires_grad_(False)
    return work


@contextmanager
def lora_fused_in_place(unet: nn.Module, lora_path: str | Path, scale: float = 1.0) -> Iterator[nn.Module]:
    """``unet`` with a LoRA file fused into its own weights for the duration of the block, then restored
    bit for bit from host copies of the original target weights (never a second UNet on the device; the
    host holds only the target weights). One target weight is fused at a time, in float32."""
    params = dict(unet.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, delta in iter_lora_deltas(unet, lora_path, scale):
                p = params[name]
                saved[name] = p.detach().to("cpu", copy=True)
                p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
        yield unet
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)


def changed_weights(base: nn.Module, fused: nn.Module, atol: float = 0.0) -> list[str]:
    """Names of parameters that differ between two UNets of the same architecture."""
    b = dict(base.named_parameters())
    out = []
    for name, p in fused.named_parameters():
        q = b.get(name)
        if q is None or q.shape != p.shape or not torch.allclose(q.float(), p.float(), atol=atol, rtol=0):
            out.append(name)
    return sorted(out)
