"""open_clip / OpenAI CLIP state dicts -> transformers ``CLIPModel``, by key mapping.

Both HPSv2 (open_clip ``ViT-H-14``) and HyperScore's backbone (OpenAI ``ViT-B/16`` inside MATE-3D) use the
same layout: ``visual.{class_embedding, positional_embedding, conv1, ln_pre, transformer.resblocks.N.*,
ln_post, proj}``, ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.*``, ``ln_final``,
``text_projection``, ``logit_scale``; each block has ``ln_1``, ``attn.in_proj_{weight,bias}`` (q, k, v
stacked), ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``. Every dimension is read from tensor
shapes; head counts (not visible in shapes) come from the caller's architecture config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mvz.errors import CheckpointError, summarize_keys
from mvz.state_dicts import load_strict

# keys that OpenAI's JIT archives carry as plain numbers; dropped by OpenAI's own build_model too
IGNORABLE = ("input_resolution", "context_length", "vocab_size")

_BLOCK = {
    "ln_1.weight": ["layer_norm1.weight"],
    "ln_1.bias": ["layer_norm1.bias"],
    "ln_2.weight": ["layer_norm2.weight"],
    "ln_2.bias": ["layer_norm2.bias"],
    "attn.out_proj.weight": ["self_attn.out_proj.weight"],
    "attn.out_proj.bias": ["self_attn.out_proj.bias"],
    "mlp.c_fc.weight": ["mlp.fc1.weight"],
    "mlp.c_fc.bias": ["mlp.fc1.bias"],
    "mlp.c_proj.weight": ["mlp.fc2.weight"],
    "mlp.c_proj.bias": ["mlp.fc2.bias"],
    "attn.in_proj_weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.in_proj_bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
}

_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # transposed
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj", "text_projection"}
_RES = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


@dataclass
class ClipDims:
    vision_width: int
    vision_layers: int
    vision_mlp: int
    patch_size: int
    image_size: int
    text_width: int
    text_layers: int
    text_mlp: int
    context_length: int
    vocab_size: int
    embed_dim: int


def _count_layers(state: dict, prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def read_dims(state: dict, what: str = "CLIP") -> ClipDims:
    """Architecture sizes of an open_clip/OpenAI CLIP state dict, from tensor shapes only."""
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
              "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{what}: not an open_clip/OpenAI CLIP state dict; missing {summarize_keys(missing)}.")
    conv = state["visual.conv1.weight"]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    if grid * grid != state["visual.positional_embedding"].shape[0] - 1:
        raise CheckpointError(f"{what}: visual.positional_embedding has {state['visual.positional_embedding'].shape[0]} rows, not 1 + a square.")
    return ClipDims(
        vision_width=conv.shape[0],
        vision_layers=_count_layers(state, "visual."),
        vision_mlp=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        patch_size=conv.shape[-1],
        image_size=grid * conv.shape[-1],
        text_width=state["token_embedding.weight"].shape[1],
        text_layers=_count_layers(state, ""),
        text_mlp=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        embed_dim=state["visual.proj"].shape[1],
    )


def build_clip_config(dims: ClipDims, vision_head_width: int, text_head_width: int, act: str,
                      eos_token_id: int, bos_token_id: int, pad_token_id: int = 0):
    from transformers import CLIPConfig

    for width, hw, tower in ((dims.vision_width, vision_head_width, "vision"), (dims.text_width, text_head_width, "text")):
        if width % hw:
            raise CheckpointError(f"CLIP {tower} width {width} is not a multiple of the head width {hw}.")
    text = dict(vocab_size=dims.vocab_size, hidden_size=dims.text_width, intermediate_size=dims.text_mlp,
                num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_width // text_head_width,
                max_position_embeddings=dims.context_length, hidden_act=act, layer_norm_eps=1e-5,
                projection_dim=dims.embed_dim, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                pad_token_id=pad_token_id)
    vision = dict(hidden_size=dims.vision_width, intermediate_size=dims.vision_mlp,
                  num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_width // vision_head_width,
                  image_size=dims.image_size, patch_size=dims.patch_size, hidden_act=act, layer_norm_eps=1e-5,
                  projection_dim=dims.embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=dims.embed_dim)


def convert_open_clip(state: dict, what: str = "CLIP") -> tuple[dict, dict[str, list[str]]]:
    """Map an open_clip-layout state dict to ``CLIPModel`` keys.

    Returns ``(hf_state, mapping)`` where ``mapping[original_key]`` lists the ``CLIPModel`` keys it fills
    (empty for ignorable scalars). Any key it does not know raises :class:`CheckpointError`.
    """
    out: dict[str, torch.Tensor] = {}
    mapping: dict[str, list[str]] = {}
    unknown = []
    for key, t in state.items():
        if key in IGNORABLE:
            mapping[key] = []
            continue
        if key in _TOP:
            hf = _TOP[key]
            out[hf] = t.t().contiguous() if key in _TRANSPOSED else t
            if key == "logit_scale":
                out[hf] = t.reshape(())
            mapping[key] = [hf]
            continue
        m = _RES.match(key)
        if m and m.group(3) in _BLOCK:
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            targets = [base + s for s in _BLOCK[m.group(3)]]
            if len(targets) == 3:
                for hf, chunk in zip(targets, t.chunk(3, dim=0), strict=True):
                    out[hf] = chunk.contiguous()
            else:
                out[targets[0]] = t
            mapping[key] = targets
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} key(s) not in the open_clip CLIP layout: {summarize_keys(unknown)}.")
    return out, mapping


def load_clip_model(hf_state: dict, config, what: str = "CLIP"):
    """Build ``CLIPModel(config)`` and load ``hf_state`` strictly (missing/unexpected keys are errors)."""
    from transformers import CLIPModel

    model = CLIPModel(config)
    load_strict(model, hf_state, f"{what}: the converted checkpoint (as CLIP)")
    return model.eval().requires_grad_(False)
