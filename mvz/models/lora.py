"""LoRA in the PEFT layout of the upstream MVC-ZigAL checkpoint (``mvczigal_lcm_sdxl_lora.safetensors``).

Keys are ``<module path>.lora_A.weight`` (r, in) and ``<module path>.lora_B.weight`` (out, r), with no
adapter name and no ``unet.``/``base_model.model.`` prefix, over the 8 target module names below. The
rank is read from the file; alpha defaults to the rank (upstream scale 1) unless the file's metadata says
otherwise. mvz saves with alpha folded into B and alpha = rank, so upstream's loader reads it
right. Loading is strict: missing or unexpected keys, or wrong shapes, are an error naming them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mvz.errors import CheckpointError, ModelNotFoundError, summarize_keys

LORA_FILENAME = "mvczigal_lcm_sdxl_lora.safetensors"
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_k_mv", "to_q_mv", "to_v_mv", "to_out_mv.0")
ADAPTER_NAME = "default"


def lora_config(rank: int = 16, alpha: float | None = None, init: str | bool = "gaussian"):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=init,
        target_modules=list(LORA_TARGETS),
    )


def add_lora(unet, rank: int = 16, alpha: float | None = None, init: str | bool = "gaussian", adapter_name: str = ADAPTER_NAME) -> None:
    """Inject LoRA layers (the MV branch must already be installed, or the ``_mv`` targets are missing)."""
    unet.add_adapter(lora_config(rank, alpha, init), adapter_name=adapter_name)


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_state_dict(unet, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=adapter_name)


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], int, float | None]:
    """(state dict, rank, alpha or None). Errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILENAME
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file {path} does not exist.", f"Pass the path of a {LORA_FILENAME} file.")
    try:
        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"LoRA file {path} is not a readable safetensors file ({exc}).") from None
    a_keys = [k for k in sd if k.endswith(".lora_A.weight")]
    if not a_keys or any(not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in sd):
        odd = [k for k in sd if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
        raise CheckpointError(
            f"{path} is not a PEFT LoRA file (unexpected keys: {summarize_keys(odd or list(sd))}).",
            "Expected '<module>.lora_A.weight' / '<module>.lora_B.weight' keys as MVC-ZigAL saves them.",
        )
    _check_lora_tensors(path, sd)
    ranks = {sd[k].shape[0] for k in a_keys}
    if len(ranks) != 1:
        raise CheckpointError(f"{path} mixes LoRA ranks {sorted(ranks)}; mvz expects one rank per file.")
    return sd, ranks.pop(), _read_alpha(path, meta)


# A LoRA weight beyond fp16's largest finite value cannot be applied in the fp16 UNet or engines: it would
# turn the image into inf/NaN (an all-black grid), so it is refused like a non-finite one.
FP16_MAX = 65504.0


def _check_lora_tensors(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Matrices of rank >= 1 holding finite values in fp16's range; the first offending key is named."""
    for key, tensor in sd.items():
        if tensor.dim() != 2 or 0 in tensor.shape:
            raise CheckpointError(f"LoRA file {path}: {key} has shape {tuple(tensor.shape)}, not a rank >= 1 matrix.",
                                  "The file is damaged or not a LoRA; re-save it.")
        values = tensor.float()
        if not bool(torch.isfinite(values).all()):
            raise CheckpointError(f"LoRA file {path}: {key} holds NaN or inf values.",
                                  "The LoRA diverged or the file is damaged; use an earlier epoch's LoRA.")
        if float(values.abs().max()) > FP16_MAX:
            raise CheckpointError(f"LoRA file {path}: {key} holds values beyond {FP16_MAX:g} (fp16's range).",
                                  "The LoRA diverged; use an earlier epoch's LoRA.")


def _read_alpha(path: Path, meta: dict[str, str]) -> float | None:
    """``lora_alpha`` from the metadata: a finite positive number, or None when absent."""
    if "lora_alpha" not in meta:
        return None
    try:
        alpha = float(meta["lora_alpha"])
    except ValueError:
        alpha = float("nan")
    if not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"LoRA file {path}: metadata lora_alpha={meta['lora_alpha']!r} is not a positive finite number.",
                              "Fix the metadata (alpha = rank means scale 1) or re-save the LoRA.")
    return alpha


def load_lora(unet, path: str | Path, scale: float = 1.0, adapter_name: str = ADAPTER_NAME) -> int:
    """Add a LoRA from an upstream-layout file to the UNet, strictly. Returns the rank."""
    from mvz.models.lora_formats import place_lora  # imported here: lora_formats imports this module

    sd, rank, alpha = read_lora_file(path)
    place_lora(unet, sd, lora_config(rank, alpha, init=True), adapter_name, scale, f"LoRA {path}")
    return rank


def set_lora_scale(unet, scale: float, adapter_name: str = ADAPTER_NAME) -> None:
    unet.set_adapters([adapter_name], weights=[float(scale)])


def lora_scale_of(rank: int, alpha: float | None) -> float:
    """PEFT's per-layer scale ``lora_alpha / r`` (no rsLoRA)."""
    return 1.0 if alpha is None else float(alpha) / rank


def fold_alpha(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """``B·scale``: the same ``W + scale·B·A`` under a config with ``lora_alpha = r`` (scale 1)."""
    if scale == 1.0:
        return dict(sd)
    return {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in sd.items()}


def save_lora(unet, path: str | Path, adapter_name: str = ADAPTER_NAME) -> Path:
    """Write the upstream layout (fp32 tensors, no prefix), atomically.

    Upstream reads a file with ``LoraConfig(r, lora_alpha=r)`` (scale 1) and cannot see alpha, so a LoRA
    trained with ``lora_alpha != r`` is saved with ``alpha/r`` folded into its B matrices and recorded as
    ``lora_alpha = r``: every loader applies the same ``W + (alpha/r)·B·A``. The trained alpha is kept in
    the metadata (``trained_lora_alpha``) for the record."""
    from mvz.atomic import save_safetensors

    cfg = unet.peft_config[adapter_name]
    if getattr(cfg, "use_rslora", False) or getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None):
        raise CheckpointError("mvz saves single-rank LoRAs with scale alpha/r only (no rsLoRA, no rank/alpha patterns).")
    sd = {k: v.detach().float().cpu() for k, v in lora_state_dict(unet, adapter_name).items()}
    sd = fold_alpha(sd, lora_scale_of(cfg.r, cfg.lora_alpha))
    meta = {"format": "pt", "lora_rank": str(cfg.r), "lora_alpha": str(cfg.r), "trained_lora_alpha": str(cfg.lora_alpha),
            "producer": "mvz"}
    return save_safetensors(path, sd, metadata=meta)


# ---- per-weight fusion (the TensorRT refit: no second UNet, one weight at a time) -----------------------
def peft_lora_modules(unet: torch.nn.Module) -> list[str]:
    """Module paths of every PEFT LoRA layer attached to ``unet`` (the weights its LoRA changes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer))


def fused_weight(unet: torch.nn.Module, module_path: str) -> torch.Tensor:
    """The weight of ``module_path`` with the active LoRA adapters of its PEFT layer fused in, in float32
    (``W + sum_a scaling_a · B_a @ A_a``, scaling = scale · alpha / r); the plain weight for a module without
    LoRA. Nothing is modified and only this one weight is materialised."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = unet.get_submodule(module_path)
    if not isinstance(layer, BaseTunerLayer):
        return layer.weight.detach().float()
    if layer.merged:
        raise ValueError(f"LoRA layer {module_path} is merged already; its base weight is not the base model's")
    base = layer.get_base_layer().weight.detach().float()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(adapter):
            raise ValueError(f"LoRA layer {module_path} uses DoRA, which refit by weight does not support")
        delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        base = base + float(layer.scaling[adapter]) * delta.to(base.device)
    return base
