"""Resolve and load a multiview model: a preset name, an assembled folder, or per-component overrides.

Offline first: nothing is downloaded. A missing component is an error that lists everything missing and
how to get it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mvz.devices import resolve_device, resolve_dtype  # noqa: F401  (re-exported: the CLI resolves with them)
from mvz.errors import CheckpointError, ModelNotFoundError, summarize_keys
from mvz.models.specs import ADAPTER_FILENAME, MODEL_CARD, PRESETS, HubSource, PresetSpec, shipped_config
from mvz.paths import models_dir

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass
class ResolvedSources:
    """Local paths of every component (folders, except ``adapter``: a file)."""

    name: str
    base: Path | None = None  # holds text_encoder(_2)/, tokenizer(_2)/, scheduler/
    unet: Path | None = None
    vae: Path | None = None
    adapter: Path | None = None
    default_resolution: int = 768
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("base", "unet", "vae", "adapter") if getattr(self, k) is not None}


def _hub_path(src: HubSource) -> Path | None:
    """A component from the Hugging Face cache, never downloading."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if src.filename:
            return Path(hf_hub_download(src.repo_id, src.filename, local_files_only=True))
        root = Path(snapshot_download(src.repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None
    return root / src.subfolder if src.subfolder else root


def _component_path(ref: str, what: str, filename: str | None = None) -> Path:
    """A user override: a local path, or a repo id found in the HF cache."""
    path = Path(ref).expanduser()
    if path.exists():
        if filename and path.is_dir():
            path = path / filename
        return path
    if "/" in ref and not ref.startswith((".", "/", "~")):
        found = _hub_path(HubSource(ref, filename=filename))
        if found is not None:
            return found
    raise ModelNotFoundError(
        f"{what} {ref!r} is neither a local path nor in the Hugging Face cache.",
        f"Pass an existing path, or download it first (hf download {ref}).",
    )


def _unet_folder(path: Path) -> Path:
    """lcm-sdxl keeps its UNet at the repo root; a full pipeline repo keeps it in unet/."""
    return path / "unet" if (path / "unet" / "config.json").is_file() else path


def resolve_sources(
    model: str,
    base_model: str | None = None,
    unet_model: str | None = None,
    vae_model: str | None = None,
    adapter: str | None = None,
    random_weights: bool = False,
) -> ResolvedSources:
    if model == "tiny":
        from mvz.models.tiny import ensure_tiny_model

        folder = ensure_tiny_model(models_dir() / "tiny")
        res = _assembled(folder, "tiny")
    elif model in PRESETS:
        spec = PRESETS[model]
        local = models_dir() / model
        res = _assembled(local, model) if local.is_dir() else _from_hub(spec)
        res.default_resolution = spec.default_resolution
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"model {model!r} is not a preset ({', '.join(PRESETS)}) nor an existing folder.",
                "Pass --model tiny, --model sdxl-lcm, or the path of an assembled model folder.",
            )
        res = _assembled(folder, str(folder))
    # per-component overrides (like the upstream inference script)
    if base_model:
        res.base = _component_path(base_model, "--base-model")
    if unet_model:
        res.unet = _unet_folder(_component_path(unet_model, "--unet-model"))
    if vae_model:
        p = _component_path(vae_model, "--vae-model")
        res.vae = p / "vae" if (p / "vae" / "config.json").is_file() else p
    if adapter:
        res.adapter = _component_path(adapter, "--adapter", ADAPTER_FILENAME)
    res.missing = [] if random_weights else _missing(res, model)
    if res.missing:
        raise ModelNotFoundError(
            f"model {res.name!r} is missing: {'; '.join(res.missing)}.",
            "Download them (hf download REPO) or pass --base-model/--unet-model/--vae-model/--adapter "
            "paths; --random-weights builds the full-size architecture without weights.",
        )
    return res


def _assembled(folder: Path, name: str) -> ResolvedSources:
    res = ResolvedSources(name=name, base=folder, unet=folder / "unet", vae=folder / "vae", adapter=folder / ADAPTER_FILENAME)
    card = folder / MODEL_CARD
    if card.is_file():
        try:
            res.default_resolution = int(json.loads(card.read_text()).get("default_resolution", 768))
        except (OSError, ValueError):
            pass
    return res


def _from_hub(spec: PresetSpec) -> ResolvedSources:
    res = ResolvedSources(name=spec.name)
    res.base = _hub_path(spec.base) if spec.base else None
    unet = _hub_path(spec.unet) if spec.unet else None
    res.unet = _unet_folder(unet) if unet else None
    vae = _hub_path(spec.vae) if spec.vae else None
    res.vae = (vae / "vae" if vae and (vae / "vae" / "config.json").is_file() else vae) if vae else None
    res.adapter = _hub_path(spec.adapter) if spec.adapter else None
    return res


def _missing(res: ResolvedSources, model: str) -> list[str]:
    spec = PRESETS.get(model)
    where = {
        "base": f"text encoders/tokenizers ({spec.base.repo_id})" if spec and spec.base else "text encoders/tokenizers",
        "unet": f"UNet ({spec.unet.repo_id})" if spec and spec.unet else "UNet",
        "vae": f"VAE ({spec.vae.repo_id})" if spec and spec.vae else "VAE",
        "adapter": f"MV-Adapter ({spec.adapter.repo_id}: {ADAPTER_FILENAME})" if spec and spec.adapter else f"MV-Adapter ({ADAPTER_FILENAME})",
    }
    out = []
    if res.base is None or not all((res.base / sub).is_dir() for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")):
        out.append(f"{where['base']} at {res.base}" if res.base else where["base"])
    if res.unet is None or not (res.unet / "config.json").is_file():
        out.append(f"{where['unet']} at {res.unet}" if res.unet else where["unet"])
    if res.vae is None or not (res.vae / "config.json").is_file():
        out.append(f"{where['vae']} at {res.vae}" if res.vae else where["vae"])
    if res.adapter is None or not res.adapter.is_file():
        out.append(f"{where['adapter']} at {res.adapter}" if res.adapter else where["adapter"])
    return out


def _diffusers_load(cls, folder: Path, what: str):
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{what} folder {folder} has no config.json.", "Point to a diffusers-format folder.")
    variant = None
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")) and not any(folder.glob("diffusion_pytorch_model*.bin")):
        raise ModelNotFoundError(f"{what} folder {folder} has no weights.", "Point to a complete diffusers-format folder.")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file() and (folder / "diffusion_pytorch_model.fp16.safetensors").is_file():
        variant = "fp16"
    try:
        model, info = cls.from_pretrained(str(folder), variant=variant, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the {what} from {folder}: {str(exc).splitlines()[0]}") from None
    check_loading_report(info, what, folder)
    return model


def check_loading_report(info: dict, what: str, folder: Path) -> None:
    """Refuse a partial load: diffusers/transformers report the keys they had to initialise at random
    (``missing_keys``), could not place (``unexpected_keys``) or of the wrong shape (``mismatched_keys``)."""
    parts = []
    for field_name, noun in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "wrong-shape")):
        keys = info.get(field_name) or []
        keys = [k[0] if isinstance(k, tuple) else k for k in keys]  # mismatched: (key, ckpt shape, model shape)
        if keys:
            parts.append(f"{len(keys)} {noun} key(s) ({summarize_keys(keys, 3)})")
    errors = [e for e in info.get("error_msgs") or [] if e]
    if errors:
        parts.append(str(errors[0]).splitlines()[0])
    if parts:
        raise CheckpointError(
            f"the {what} in {folder} does not fit its config: {'; '.join(parts)}.",
            "Use a complete checkpoint in the diffusers/transformers layout of this component (nothing is loaded "
            "with random weights).",
        )


def _load_text_encoder(cls, folder: Path, what: str):
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the {what} from {folder}: {str(exc).splitlines()[0]}") from None
    check_loading_report(info, what, folder)
    return model


def load_model(
    model: str = "tiny",
    *,
    base_model: str | None = None,
    unet_model: str | None = None,
    vae_model: str | None = None,
    adapter: str | None = None,
    random_weights: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
):
    """Load a :class:`~mvz.models.multiview.MultiviewModel` ready for inference (eval, no grad)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from mvz.models.adapter import build_camera_adapter, load_mvadapter_file
    from mvz.models.attention import MVSettings, install_mv_processors
    from mvz.models.multiview import ModelInfo, MultiviewModel
    from mvz.quiet import quiet_libraries

    quiet_libraries()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    res = resolve_sources(model, base_model, unet_model, vae_model, adapter, random_weights)

    if random_weights:
        prefix = PRESETS[model].configs if model in PRESETS and PRESETS[model].configs else None
        if model == "tiny":
            prefix = None
        if prefix is None and model != "tiny":
            raise ModelNotFoundError(f"--random-weights needs a preset with shipped configs (sdxl-lcm), not {model!r}.")
        # build directly on the target device in the target dtype: no fp32 copy of a 3B-parameter UNet
        with torch.device(dev), _default_dtype(dt):
            if model == "tiny":
                from mvz.models import tiny

                unet = UNet2DConditionModel.from_config(tiny.tiny_unet_config())
                vae = AutoencoderKL.from_config(tiny.tiny_vae_config())
                te1 = CLIPTextModel(CLIPTextConfig(**tiny.tiny_text_config(False)))
                te2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny.tiny_text_config(True)))
                tok_dir = res.base
            else:
                unet = UNet2DConditionModel.from_config(shipped_config(prefix, "unet"))
                vae = AutoencoderKL.from_config(shipped_config(prefix, "vae"))
                te1 = CLIPTextModel(CLIPTextConfig(**shipped_config(prefix, "text_encoder")))
                te2 = CLIPTextModelWithProjection(CLIPTextConfig(**shipped_config(prefix, "text_encoder_2")))
                tok_dir = _random_tokenizers()
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir / "tokenizer"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir / "tokenizer_2"))
    else:
        unet = _diffusers_load(UNet2DConditionModel, res.unet, "UNet")
        vae = _diffusers_load(AutoencoderKL, res.vae, "VAE")
        te1 = _load_text_encoder(CLIPTextModel, res.base / "text_encoder", "text encoder")
        te2 = _load_text_encoder(CLIPTextModelWithProjection, res.base / "text_encoder_2", "second text encoder")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(res.base / "tokenizer"), local_files_only=True)
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(res.base / "tokenizer_2"), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizers from {res.base}: {str(exc).splitlines()[0]}") from None

    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    settings = MVSettings(num_views=6)  # the model's defaults; every call passes its own
    # MV branch first (upstream load order), then the adapter file, then any LoRA
    # random weights: the MV branch and camera adapter are made in the target dtype too (no fp32 transient)
    with _default_dtype(dt) if random_weights else contextlib.nullcontext():
        install_mv_processors(unet, init_from_base=True)
        cam_adapter = build_camera_adapter(unet.config, vae_scale_factor=vae_scale)
    if not random_weights:
        load_mvadapter_file(res.adapter, unet, cam_adapter)
    else:
        for proc in unet.attn_processors.values():  # random but non-zero MV branch, so it costs what it costs
            if hasattr(proc, "to_out_mv"):
                torch.nn.init.normal_(proc.to_out_mv[0].weight, std=0.02)

    info = ModelInfo(name=res.name, sources=res.as_dict(), default_resolution=res.default_resolution, random_weights=random_weights)
    sched_cfg = {}
    if res.base is not None and (res.base / "scheduler" / "scheduler_config.json").is_file():
        sched_cfg = json.loads((res.base / "scheduler" / "scheduler_config.json").read_text())
    mv = MultiviewModel(unet, vae, te1, te2, tokenizer, tokenizer_2, cam_adapter, settings, info, sched_cfg)
    mv.to(device=dev, dtype=dt)
    mv.vae.to(device=dev, dtype=vae_dtype or default_vae_dtype(mv.vae.config, dt))
    mv.eval()
    if lora:
        from mvz.models.lora_formats import load_lora_any  # mvz/upstream PEFT, diffusers or kohya layout

        load_lora_any(mv.unet, lora, scale=lora_scale)
        mv.unet.to(device=dev)
        mv.unet.requires_grad_(False)
        info.lora, info.lora_scale = str(lora), lora_scale
    return mv


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def default_vae_dtype(vae_config, dt: torch.dtype) -> torch.dtype:
    """The model's dtype for the VAE, except fp16 where the VAE's config says it must upcast
    (``force_upcast``, diffusers' own policy: false for the fp16-fix weights, true for the stock SDXL VAE,
    which overflows to NaN in fp16): then fp32."""
    from mvz.models.multiview import vae_fp16_safe

    if dt != torch.float16:
        return dt
    return torch.float16 if vae_fp16_safe(vae_config) else torch.float32


def _random_tokenizers() -> Path:
    """Tokenizer files for --random-weights full-size models (byte-level CLIP BPE, no download)."""
    from mvz.models.tiny_tokenizer import write_clip_tokenizer

    folder = models_dir() / "random-tokenizers"
    if not (folder / "tokenizer_2" / "vocab.json").is_file():
        write_clip_tokenizer(folder / "tokenizer")
        write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    return folder
