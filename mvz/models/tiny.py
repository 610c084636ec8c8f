"""The ``tiny`` preset: the full model family at toy size, written in the real on-disk formats.

Diffusers folders for the UNet, VAE and scheduler, transformers folders for both text encoders, CLIP
tokenizer files, and ``mvadapter_t2mv_sdxl.safetensors`` in the upstream key layout (UNet ``_mv`` keys +
``adapter.*`` keys). Same structure as SDXL (3 UNet levels, attention in levels 1 and 2, 2 resnets per
level, full_adapter_xl camera encoder, VAE factor 8), so every loader and key path is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mvz.atomic import atomic_dir, save_safetensors, write_json
from mvz.models.specs import ADAPTER_FILENAME, MODEL_CARD
from mvz.models.tiny_tokenizer import clip_vocab, write_clip_tokenizer

TINY_VERSION = 2  # 2: text encoders in the SDXL key layout (text_model.*)
TINY_RESOLUTION = 64
TINY_TEXT_DIM = 32


def tiny_unet_config() -> dict:
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": TINY_RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 8],
        "cross_attention_dim": 2 * TINY_TEXT_DIM,
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + TINY_TEXT_DIM,
        "time_cond_proj_dim": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def tiny_vae_config() -> dict:
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": TINY_RESOLUTION,
        "scaling_factor": 0.13025,
        "force_upcast": False,
    }


def tiny_text_config(with_projection: bool) -> dict:
    vocab = clip_vocab()
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": len(vocab),
        "hidden_size": TINY_TEXT_DIM,
        "intermediate_size": 2 * TINY_TEXT_DIM,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": TINY_TEXT_DIM,
        "hidden_act": "gelu" if with_projection else "quick_gelu",
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def scheduler_config() -> dict:
    from mvz.models.specs import shipped_config

    return shipped_config("sdxl-lcm", "scheduler")


TEXT_MODEL_PREFIX = "text_model."
TEXT_PROJECTION = "text_projection.weight"


def sdxl_text_encoder_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names of the real SDXL ``text_encoder/`` and ``text_encoder_2/`` files: ``text_model.*`` (plus
    ``text_projection.weight`` in the second). transformers 5 writes a fresh ``CLIPTextModel`` without the
    ``text_model.`` prefix, which transformers 4.x then loads with every weight missing (random)."""
    return {k if k.startswith(TEXT_MODEL_PREFIX) or k == TEXT_PROJECTION else TEXT_MODEL_PREFIX + k: v
            for k, v in state.items()}


def save_text_encoder(model, folder: Path) -> None:
    """``save_pretrained`` (config and weights), then the weights rewritten in the SDXL key layout."""
    from safetensors.torch import load_file

    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    if not weights.is_file():  # a sharded or renamed save would escape the rewrite below
        raise RuntimeError(f"transformers did not write {weights}")
    save_safetensors(weights, sdxl_text_encoder_layout(load_file(str(weights))), metadata={"format": "pt"})


def _is_current(folder: Path) -> bool:
    card = folder / MODEL_CARD
    if not card.is_file():
        return False
    try:
        return json.loads(card.read_text()).get("tiny_version") == TINY_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def ensure_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model to ``folder`` unless a current copy is there. Atomic: a folder rename."""
    if _is_current(folder):
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mvz.models.adapter import build_camera_adapter
    from mvz.models.attention import install_mv_processors, mv_processors
    from mvz.quiet import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    with atomic_dir(folder) as tmp:
        unet = UNet2DConditionModel.from_config(tiny_unet_config())
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        AutoencoderKL.from_config(tiny_vae_config()).save_pretrained(tmp / "vae", safe_serialization=True)
        save_text_encoder(CLIPTextModel(CLIPTextConfig(**tiny_text_config(False))), tmp / "text_encoder")
        save_text_encoder(CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_config(True))), tmp / "text_encoder_2")
        write_clip_tokenizer(tmp / "tokenizer")
        write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config())

        # MV-Adapter file: the MV branch (upstream init, then a trained-looking non-zero to_out_mv so the
        # branch matters) and the camera adapter, in the upstream flat key layout.
        install_mv_processors(unet)
        weights: dict[str, torch.Tensor] = {}
        for name, proc in mv_processors(unet).items():
            torch.nn.init.normal_(proc.to_out_mv[0].weight, std=0.05)
            torch.nn.init.normal_(proc.to_out_mv[0].bias, std=0.01)
            for k, v in proc.state_dict().items():
                weights[f"{name}.{k}"] = v
        adapter = build_camera_adapter(unet.config, vae_scale_factor=8)
        weights.update(adapter.state_dict())
        save_safetensors(tmp / ADAPTER_FILENAME, weights)
        write_json(
            tmp / MODEL_CARD,
            {"name": "tiny", "tiny_version": TINY_VERSION, "default_resolution": TINY_RESOLUTION, "random_weights": True},
        )
    return folder
