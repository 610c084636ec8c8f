"""ImageReward: BLIP ``ImageReward.pt`` + ``med_config.json`` converted into transformers' BLIP modules.

* ``blip.visual_encoder.*`` (BLIP's timm-style ViT) -> ``BlipVisionModel`` (LayerNorm eps 1e-6, heads =
  width / 64 as BLIP's ``create_vit``);
* ``blip.text_encoder.*`` (BLIP's ``med.py`` BERT with cross-attention, no pooler) -> ``BlipTextModel``;
* ``mlp.layers.{0,2,4,6,7}`` -> the affine head (Linear/Dropout stack without non-linearities).

Score = ``(mlp(text_encoder(prompt, cross-attending to all image tokens)[CLS]) - 0.16717362830052426)
/ 1.0333394966054072`` (reference section 4). Other ``blip.*`` tensors (projections used only in BLIP
pre-training) are recognised and left out; anything else is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from mvz.errors import CheckpointError, summarize_keys
from mvz.paths import rewards_dir
from mvz.rewards.base import RewardOutput, register_reward
from mvz.rewards.checkpoints import find_file, find_folder, load_torch_state, strip_prefix
from mvz.rewards.preprocess import blip_preprocess, check_images
from mvz.rewards.runtime import ModelReward
from mvz.state_dicts import load_strict

HF_REPO = "THUDM/ImageReward"
SOURCE = f"https://huggingface.co/{HF_REPO} (files ImageReward.pt and med_config.json)"
TOKENIZER_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
MLP_LAYERS = (0, 2, 4, 6, 7)
VISION_HEAD_WIDTH = 64  # BLIP create_vit: base 768/12, large 1024/16
VISION_LN_EPS = 1e-6

_VIS_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIS_BLOCK = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def convert_imagereward(state: dict, med_config: dict) -> tuple[dict, dict, dict, dict[str, list[str]]]:
    """Split/rename an ImageReward state dict.

    Returns ``(vision_state, text_state, mlp_state, mapping)``; ``mapping[original_key]`` lists the
    destination keys (prefixed ``vision:``, ``text:``, ``mlp:``; empty for recognised unused tensors).
    """
    vision, text, mlp, mapping, unknown = {}, {}, {}, {}, []
    for key, t in state.items():
        if key.startswith("blip.visual_encoder."):
            sub = key[len("blip.visual_encoder."):]
            if sub in _VIS_TOP:
                dst = _VIS_TOP[sub]
            elif (m := _BLOCK_RE.match(sub)) and m.group(2) in _VIS_BLOCK:
                dst = f"encoder.layers.{m.group(1)}.{_VIS_BLOCK[m.group(2)]}.{m.group(3)}"
            else:
                unknown.append(key)
                continue
            vision[dst] = t
            mapping[key] = [f"vision:{dst}"]
        elif key.startswith("blip.text_encoder."):
            sub = key[len("blip.text_encoder."):]
            if sub == "embeddings.position_ids":  # a buffer in older BERT code: arange, not a weight
                mapping[key] = []
                continue
            text[sub] = t
            mapping[key] = [f"text:{sub}"]
        elif key.startswith("blip."):
            mapping[key] = []  # e.g. vision_proj / text_proj: BLIP pre-training only, unused by the score
        elif (m := re.match(r"^mlp\.layers\.(\d+)\.(weight|bias)$", key)) and int(m.group(1)) in MLP_LAYERS:
            mlp[f"{m.group(1)}.{m.group(2)}"] = t
            mapping[key] = [f"mlp:{m.group(1)}.{m.group(2)}"]
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"imagereward: {len(unknown)} unexpected key(s): {summarize_keys(unknown)}.",
                              "Is it ImageReward.pt?")
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"]
    missing = [f"blip.visual_encoder.{k}" for k in need if _VIS_TOP[k] not in vision]
    missing += [f"blip.text_encoder.{k}" for k in ("embeddings.word_embeddings.weight",
                "embeddings.position_embeddings.weight", "encoder.layer.0.crossattention.self.key.weight") if k not in text]
    missing += [f"mlp.layers.{i}.{p}" for i in MLP_LAYERS for p in ("weight", "bias") if f"{i}.{p}" not in mlp]
    if missing:
        raise CheckpointError(f"imagereward: checkpoint is missing {len(missing)} key(s): {summarize_keys(missing)}.",
                              "Is it ImageReward.pt?")
    return vision, text, mlp, mapping


def vision_config(vision: dict):
    from transformers import BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision["embeddings.position_embedding"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=max(1, width // VISION_HEAD_WIDTH),
                            image_size=grid * patch, patch_size=patch, hidden_act="gelu",
                            layer_norm_eps=VISION_LN_EPS)


def text_config(text: dict, med: dict, vision_width: int, tokenizer):
    from transformers import BlipTextConfig

    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    if med.get("hidden_size", hidden) != hidden or med.get("vocab_size", vocab) != vocab:
        raise CheckpointError(f"imagereward: med_config.json (hidden {med.get('hidden_size')}, vocab "
                              f"{med.get('vocab_size')}) does not fit the checkpoint (hidden {hidden}, vocab {vocab}).")
    layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    return BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=vision_width,  # BLIP: encoder_width = ViT width
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,  # builds the cross-attention
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    load_strict(module, state, f"imagereward: the {what} weights")


def load_bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    # BLIP's init_tokenizer: bert-base-uncased + [DEC] (bos) + [ENC] (additional special token)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


class ImageReward(ModelReward):
    name = "imagereward"
    kind = "per_view"

    def __init__(self, checkpoint: str | os.PathLike | None = None, med_config: str | os.PathLike | None = None,
                 tokenizer: str | os.PathLike | None = None, device=None, dtype=None,
                 memory_budget_mb: float = 2048.0, max_batch: int | None = None):
        super().__init__(device, dtype, memory_budget_mb, max_batch)
        from transformers import BlipTextModel, BlipVisionModel

        home = rewards_dir() / "imagereward"
        path = find_file("imagereward", ("ImageReward.pt",), checkpoint, [], [(HF_REPO, "ImageReward.pt")], SOURCE)
        cfg_path = find_file("imagereward", ("med_config.json",), med_config if med_config else path.parent, [],
                             [(HF_REPO, "med_config.json")], SOURCE)
        tok_folder = find_folder("imagereward", "vocab.txt", "BERT tokenizer (bert-base-uncased)", tokenizer,
                                 [path.parent / "tokenizer", home / "tokenizer"], TOKENIZER_REPOS,
                                 f"https://huggingface.co/{TOKENIZER_REPOS[0]}")
        try:
            med = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"imagereward: cannot read {cfg_path}: {exc}.") from None
        self.tokenizer = load_bert_tokenizer(tok_folder)
        state = strip_prefix(load_torch_state(path, "imagereward"))
        vis, txt, mlp, self.key_mapping = convert_imagereward(state, med)
        self.visual = BlipVisionModel(vision_config(vis))
        _load_strict(self.visual, vis, "visual encoder")
        self.text = BlipTextModel(text_config(txt, med, self.visual.config.hidden_size, self.tokenizer),
                                  add_pooling_layer=False)
        _load_strict(self.text, txt, "text encoder")
        self.mlp = torch.nn.Sequential(*[torch.nn.Linear(mlp[f"{i}.weight"].shape[1], mlp[f"{i}.weight"].shape[0])
                                         for i in MLP_LAYERS])
        for lin, i in zip(self.mlp, MLP_LAYERS, strict=True):
            lin.weight.data.copy_(mlp[f"{i}.weight"])
            lin.bias.data.copy_(mlp[f"{i}.bias"])
        if self.mlp[0].in_features != self.text.config.hidden_size or self.mlp[-1].out_features != 1:
            raise CheckpointError("imagereward: the MLP head does not fit the text encoder width or has more than one output.")
        self._setup_modules(self.visual, self.text, self.mlp)
        self.checkpoint = str(path)
        vc = self.visual.config
        self.image_size = int(vc.image_size)
        self._tokens = (self.image_size // vc.patch_size) ** 2 + 1
        self._width, self._heads = vc.hidden_size, vc.num_attention_heads

    @torch.no_grad()
    def raw_scores(self, flat: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``mlp(CLS)`` before standardisation, one per image of ``flat`` ``[N,3,H,W]`` with ``prompts`` (N)."""
        enc = self.tokenize_truncating(self.tokenizer, prompts, MAX_LENGTH)

        def run(s: slice) -> torch.Tensor:
            px = blip_preprocess(flat[s].to(self.device), self.image_size).to(self.dtype)
            img = self.visual(pixel_values=px).last_hidden_state
            atts = torch.ones(img.shape[:-1], dtype=torch.long, device=self.device)
            out = self.text(input_ids=enc["input_ids"][s].to(self.device),
                            attention_mask=enc["attention_mask"][s].to(self.device),
                            encoder_hidden_states=img, encoder_attention_mask=atts)
            return self.mlp(out.last_hidden_state[:, 0, :]).squeeze(-1)

        return self.map_chunks(flat.shape[0], self.chunk_size(self._tokens, self._width, self._heads), run)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        b, v = check_images(images, prompts, self.name)
        flat = images.reshape(b * v, *images.shape[2:])
        raw = self.raw_scores(flat, [p for p in prompts for _ in range(v)])
        per_view = ((raw - MEAN) / STD).reshape(b, v)
        return RewardOutput(per_set=per_view.mean(1), per_view=per_view)


@register_reward("imagereward")
def make_imagereward(**kwargs) -> ImageReward:
    return ImageReward(**kwargs)
