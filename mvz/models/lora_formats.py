"""LoRA files in the layouts users bring, read into mvz's PEFT layout; mvz's LoRAs written out in two.

Layouts read (told apart by their keys):

- ``peft``: mvz's and upstream MVC-ZigAL's own (``<module>.lora_A.weight`` / ``.lora_B.weight``, no prefix),
  read by ``mvz.models.lora.read_lora_file`` exactly as before;
- ``diffusers``: the same keys under ``unet.`` (what ``StableDiffusionXLPipeline.save_lora_weights`` writes),
  or diffusers' older ``unet.<module>.lora.down.weight`` / ``.to_q_lora.up.weight`` spelling; an alpha comes from
  the file's ``lora_adapter_metadata`` (diffusers' own), else alpha = rank;
- ``kohya``: ``lora_unet_<module with . as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (kohya-ss,
  A1111, ComfyUI), for the base SDXL layers; its sgm block names (``input_blocks_4_1``) are mapped with the UNet's
  ``layers_per_block``.

Renaming is diffusers' job, not ours: kohya names go through ``StableDiffusionXLLoraLoaderMixin.lora_state_dict``
one module at a time (so each module keeps its own alpha and its source key for messages), and the older diffusers
spellings through ``diffusers.utils.convert_unet_state_dict_to_peft``. A per-module ``alpha/rank`` is folded into
B, so one file-level scale holds, as ``mvz.models.lora.save_lora`` does.

Strict, like the PEFT reader: a key of an unknown kind, a module that is not a linear layer of the UNet, a
wrong shape, a text-encoder key, NaN/inf or values beyond fp16 are errors naming the file's own key. LoRAs on the
text encoders (kohya ``lora_te*``, diffusers ``text_encoder*``) are refused: mvz applies LoRAs to the UNet only.
The MV branch (``*_mv`` modules) travels in the PEFT spellings only (old diffusers spellings would lose its
``.processor.`` path part to diffusers' renaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mvz.errors import CheckpointError, ModelNotFoundError, summarize_keys
from mvz.models.lora import ADAPTER_NAME, LORA_FILENAME

PEFT, DIFFUSERS, KOHYA = "peft", "diffusers", "kohya"
LAYOUTS = (PEFT, DIFFUSERS, KOHYA)
WRITTEN_LAYOUTS = ("upstream", "diffusers")  # `mvz lora convert --to`; upstream is the PEFT layout
UNET_PREFIX = "unet."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
KOHYA_UNET = "lora_unet_"
KOHYA_TEXT = ("lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_TEXT_NAMES = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
PEFT_ENDINGS = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA in mvz's PEFT layout: ``W + (alpha/rank)·B·A`` per module, with alpha None meaning scale 1."""

    path: Path
    layout: str
    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: float | None
    sources: dict[str, str]  # PEFT key -> the file's key it came from (for messages)

    @property
    def modules(self) -> list[str]:
        return sorted({_module_of(k) for k in self.state_dict})


def resolve_lora_path(path: str | Path) -> Path:
    """A file, or a folder holding ``mvczigal_lcm_sdxl_lora.safetensors``; a missing one is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILENAME
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file {path} does not exist.", "Pass the path of a LoRA .safetensors file.")
    return path


def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a safetensors file, without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys()), fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"LoRA file {path} is not a readable safetensors file ({exc}).") from None


def detect_layout(keys: list[str]) -> str:
    """``kohya`` if any key has a kohya prefix, ``diffusers`` if any has a diffusers component prefix, else ``peft``
    (whose reader refuses whatever else is there)."""
    if any(k.startswith((KOHYA_UNET, *KOHYA_TEXT)) for k in keys):
        return KOHYA
    if any(k.startswith((UNET_PREFIX, *TEXT_ENCODER_PREFIXES)) for k in keys):
        return DIFFUSERS
    return PEFT


def read_lora(path: str | Path, unet_config=None) -> LoraWeights:
    """Read a LoRA file of any layout above into mvz's PEFT layout (alpha folded for diffusers and kohya files).

    ``unet_config`` (a UNet's ``.config``) maps kohya's sgm block names; without it only diffusers names fit."""
    from mvz.models.lora import read_lora_file

    path = resolve_lora_path(path)
    keys, meta = read_header(path)
    layout = detect_layout(keys)
    if layout == PEFT:
        sd, rank, alpha = read_lora_file(path)
        return LoraWeights(path, PEFT, sd, rank, alpha, {k: k for k in sd})
    if layout == DIFFUSERS:
        sd, sources, scale = _read_diffusers(path, keys)
    else:
        sd, sources, scale = _read_kohya(path, unet_config)
    return _checked(path, layout, sd, sources, scale)


def _refuse_text_encoders(path: Path, keys: list[str]) -> None:
    if keys:
        parts = sorted({k.split(".")[0] if k.startswith(TEXT_ENCODER_PREFIXES) else _KOHYA_TEXT_NAMES[k.split("_")[1]]
                        for k in keys})
        raise CheckpointError(
            f"LoRA file {path} has {len(keys)} text-encoder keys ({', '.join(parts)}: {summarize_keys(keys, 2)}); "
            "mvz applies LoRAs to the UNet only.", "Use the UNet part of the LoRA (a UNet-only file) instead.")


def _refuse_strays(path: Path, stray: list[str], expected: str) -> None:
    if stray:
        raise CheckpointError(f"LoRA file {path}: {len(stray)} keys fit no LoRA module ({summarize_keys(stray, 3)}).",
                              f"Expected {expected}.")


def _read_diffusers(path: Path, keys: list[str]):
    """``unet.``-prefixed keys, PEFT or older diffusers spelling; the scale from diffusers' own metadata."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    _refuse_text_encoders(path, [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)])
    _refuse_strays(path, [k for k in keys if not k.startswith(UNET_PREFIX)], "only 'unet.'-prefixed LoRA keys")
    raw, _, metadata = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        str(path), use_safetensors=True, local_files_only=True, return_lora_metadata=True)
    sd, sources = {}, {}
    for key, tensor in raw.items():
        name = key.removeprefix(UNET_PREFIX)
        if not name.endswith(PEFT_ENDINGS):  # one key at a time, so each keeps its source name
            name = next(iter(convert_unet_state_dict_to_peft({name: tensor})))
        sd[name], sources[name] = tensor, key
    _refuse_strays(path, [sources[k] for k in sd if not k.endswith(PEFT_ENDINGS)],
                   "'unet.<module>.lora_A.weight' / '.lora_B.weight' (or diffusers' '.lora.down'/'.lora.up') keys")
    return sd, sources, _diffusers_scale(path, metadata or {})


def _diffusers_scale(path: Path, metadata: dict) -> float:
    """``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (1 when absent, diffusers' own convention)."""
    from mvz.models.lora import _read_alpha

    config = {k.removeprefix(UNET_PREFIX): v for k, v in metadata.items() if k.startswith(UNET_PREFIX)}
    if not config:
        return 1.0
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise CheckpointError(f"LoRA file {path} uses per-module ranks/alphas, rsLoRA or DoRA in its metadata.",
                              "mvz reads single-rank LoRAs with scale lora_alpha/r; re-save it without them.")
    rank = config.get("r")
    alpha = _read_alpha(path, {"lora_alpha": str(config.get("lora_alpha", rank))})
    if not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"LoRA file {path}: metadata r={rank!r} is not a rank >= 1.", "Re-save the LoRA.")
    return alpha / rank


def _read_kohya(path: Path, unet_config):
    """``lora_unet_*`` modules, each renamed by diffusers on its own, its alpha/rank folded into its up matrix."""
    from safetensors.torch import load_file

    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray, text = [], []
    for key, tensor in load_file(str(path)).items():
        name, _, part = key.partition(".")
        if name.startswith(KOHYA_TEXT):
            text.append(key)
        elif not name.startswith(KOHYA_UNET) or part not in KOHYA_PARTS:
            stray.append(key)
        else:
            groups.setdefault(name, {})[part] = tensor
    _refuse_text_encoders(path, text)
    _refuse_strays(path, stray, "kohya 'lora_unet_<module>.lora_down.weight' / '.lora_up.weight' / '.alpha' keys")
    sd, sources = {}, {}
    for name, parts in groups.items():
        a_key, b_key, a, b = _kohya_module(path, name, parts, unet_config)
        sd[a_key], sd[b_key] = a, b
        sources[a_key], sources[b_key] = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
    return sd, sources, 1.0


def _kohya_module(path: Path, name: str, parts: dict[str, torch.Tensor], unet_config):
    """(A key, B key, A, B·alpha/rank) for one kohya module, renamed by diffusers."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    from mvz.models.lora import _read_alpha

    missing = [p for p in KOHYA_PARTS[:2] if p not in parts]
    if missing:
        raise CheckpointError(f"LoRA file {path}: {name} has no {missing[0]} (its other half is missing).",
                              "The file is damaged or not a LoRA; re-save it.")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0] if down.dim() else 0
    alpha = _read_alpha(path, {"lora_alpha": str(float(parts["alpha"]))}) if "alpha" in parts else rank
    try:
        renamed, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            {f"{name}.{p}": t for p, t in parts.items() if p != "alpha"}, unet_config=unet_config)
    except (ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"LoRA file {path}: diffusers cannot map {name} to a UNet module ({exc}).") from None
    peft = convert_unet_state_dict_to_peft({k.removeprefix(UNET_PREFIX): v for k, v in renamed.items()})
    a_key = next((k for k in peft if k.endswith(".lora_A.weight")), None)
    b_key = next((k for k in peft if k.endswith(".lora_B.weight")), None)
    if a_key is None or b_key is None or _module_of(a_key) != _module_of(b_key):
        raise CheckpointError(f"LoRA file {path}: {name} maps to no UNet module (diffusers made {sorted(peft)}).")
    scale = alpha / rank if rank else 1.0
    return a_key, b_key, down, up * scale if scale != 1.0 else up


def _checked(path: Path, layout: str, sd, sources, scale: float) -> LoraWeights:
    """The PEFT reader's own checks (rank >= 1 matrices, finite, fp16 range, one rank) on the converted tensors,
    naming the file's keys; then ``scale`` folded into B."""
    from mvz.models.lora import _check_lora_tensors, fold_alpha

    sd = fold_alpha(sd, scale)
    _check_lora_tensors(path, {sources[k]: v for k, v in sd.items()})
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise CheckpointError(f"{path} mixes LoRA ranks {sorted(ranks)}; mvz expects one rank per file.")
    lonely = sorted({_module_of(k) for k in sd if k.endswith(PEFT_ENDINGS[0])}
                    ^ {_module_of(k) for k in sd if k.endswith(PEFT_ENDINGS[1])})
    if lonely:
        raise CheckpointError(f"LoRA file {path}: {summarize_keys(lonely, 3)} have an A or a B matrix but not both.",
                              "The file is damaged; re-save it.")
    return LoraWeights(path, layout, sd, ranks.pop(), None, sources)


def _module_of(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


# ---- into a UNet ----------------------------------------------------------------------------------------------

def load_lora_any(unet, path: str | Path, scale: float = 1.0, adapter_name: str = ADAPTER_NAME) -> int:
    """Add a LoRA of any layout to the UNet, strictly. Returns the rank.

    PEFT-layout files go through ``mvz.models.lora.load_lora`` unchanged (every target module must be present);
    diffusers and kohya files target exactly the modules they carry (a style LoRA touches the base layers only),
    each of which must be a linear layer of this UNet with the file's shapes."""
    from mvz.models.lora import load_lora

    path = resolve_lora_path(path)
    if detect_layout(read_header(path)[0]) == PEFT:
        return load_lora(unet, path, scale, adapter_name)
    lora = read_lora(path, unet_config=unet.config)
    _require_linear_modules(unet, lora)
    place_lora(unet, lora.state_dict, _targeted_config(lora), adapter_name, scale, f"LoRA {path}")
    return lora.rank


def _targeted_config(lora: LoraWeights):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, init_lora_weights=True,
                      target_modules=lora.modules)


def _require_linear_modules(unet, lora: LoraWeights) -> None:
    """Each module the LoRA names is a linear layer of this UNet (possibly already wrapped by another adapter)."""
    modules = dict(unet.named_modules())
    for module in lora.modules:
        layer = modules.get(module)
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, torch.nn.Linear):
            key = lora.sources.get(f"{module}.lora_A.weight", module)
            what = "is not in this UNet" if layer is None else f"is a {type(layer).__name__}, not a linear layer"
            raise CheckpointError(f"LoRA {lora.path}: {key} maps to {module}, which {what}.",
                                  "Use a LoRA made for an SDXL UNet (mvz reads its attention and linear layers).")


def place_lora(unet, sd: dict[str, torch.Tensor], config, adapter_name: str, scale: float, what: str) -> None:
    """Inject ``config`` as ``adapter_name`` and set ``sd`` into it, all or nothing: any key PEFT would leave out,
    or any shape that differs, removes the adapter again and is an error naming the keys."""
    from peft.utils import set_peft_model_state_dict

    from mvz.models.lora import has_lora, lora_state_dict, set_lora_scale
    from mvz.state_dicts import check_state

    if has_lora(unet) and adapter_name in unet.peft_config:
        unet.delete_adapters(adapter_name)
    unet.add_adapter(config, adapter_name=adapter_name)
    expected = lora_state_dict(unet, adapter_name)
    try:  # the one strict check (mvz.state_dicts), as every adapter and reward loader uses
        check_state(sd, expected, f"{what} (for this model)",
                    "Use a LoRA trained for this model (same UNet, MV-Adapter and rank layout).")
    except CheckpointError:
        unet.delete_adapters(adapter_name)
        raise
    ref = next(iter(expected.values()))
    result = set_peft_model_state_dict(unet, {k: v.to(ref.dtype) for k, v in sd.items()}, adapter_name=adapter_name)
    leftovers = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora" in k]
    if leftovers:
        unet.delete_adapters(adapter_name)
        raise CheckpointError(f"{what}: PEFT did not place {summarize_keys(leftovers)}.")
    set_lora_scale(unet, scale, adapter_name)


# ---- written out ----------------------------------------------------------------------------------------------

def upstream_tensors(lora: LoraWeights) -> dict[str, torch.Tensor]:
    """The PEFT keys with any file-level alpha folded into B, fp32: upstream's ``LoraConfig(r, lora_alpha=r)``
    and diffusers' alpha = rank convention both apply it right."""
    from mvz.models.lora import fold_alpha, lora_scale_of

    sd = fold_alpha(lora.state_dict, lora_scale_of(lora.rank, lora.alpha))
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def write_lora(lora: LoraWeights, out: str | Path, layout: str) -> Path:
    """Write ``lora`` atomically as ``upstream`` (mvz/MVC-ZigAL PEFT keys) or ``diffusers`` (``unet.``-prefixed
    PEFT keys with diffusers' ``lora_adapter_metadata``, written by diffusers' own ``save_lora_weights``, so
    ``load_lora_weights`` of MV-Adapter's SDXL pipeline places every module, the ``_mv`` ones included)."""
    from mvz.atomic import atomic_path, save_safetensors

    tensors = upstream_tensors(lora)
    if layout == "upstream":
        meta = {"format": "pt", "lora_rank": str(lora.rank), "lora_alpha": str(lora.rank), "producer": "mvz"}
        return save_safetensors(out, tensors, metadata=meta)
    if layout != "diffusers":
        raise ValueError(f"unknown LoRA layout {layout!r}")
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    out = Path(out)
    config = {"r": lora.rank, "lora_alpha": lora.rank, "target_modules": lora.modules}
    with atomic_path(out) as tmp:
        StableDiffusionXLLoraLoaderMixin.save_lora_weights(
            save_directory=str(tmp.parent), unet_lora_layers=tensors, weight_name=tmp.name,
            unet_lora_adapter_metadata=config)
    return out
