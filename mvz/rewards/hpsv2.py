"""HPSv2: the open_clip ``ViT-H-14`` checkpoint ``HPS_v2_compressed.pt`` (reward ``hpsv2``) or
``HPS_v2.1_compressed.pt`` (reward ``hpsv2.1``) converted into transformers' CLIP.

No open_clip: the state dict (under ``"state_dict"``, open_clip names) is mapped key by key
(:mod:`mvz.rewards.clip_convert`) and loaded strictly. Score = diagonal of normalised
``image_features @ text_features.T``, i.e. a cosine per view (reference section 3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mvz.errors import CheckpointError, InputError
from mvz.paths import rewards_dir
from mvz.rewards.base import register_reward
from mvz.rewards.checkpoints import find_file, find_folder, load_torch_state, strip_prefix
from mvz.rewards.clip_convert import build_clip_config, convert_open_clip, load_clip_model, read_dims
from mvz.rewards.runtime import ClipPerViewReward
from mvz.rewards.text import clip_tokenize

# one reward name per HPS version, each finding only its own file (never one version by folder order)
FILENAMES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
HF_REPO = "xswu/HPSv2"
TOKENIZER_REPOS = ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "openai/clip-vit-large-patch14")
# open_clip's model config format; the values of ViT-H-14 (heads are not visible in tensor shapes)
ARCH_FILES = ("open_clip_config.json", "ViT-H-14.json")
VIT_H_14 = {"embed_dim": 1024, "quick_gelu": False,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}


def read_arch(ckpt: Path) -> dict:
    for name in ARCH_FILES:
        p = ckpt.parent / name
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except ValueError as exc:
                raise CheckpointError(f"hpsv2: cannot parse {p}: {exc}.") from None
    return VIT_H_14


def hps_state_dict(obj: dict) -> dict:
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict", None), dict) else obj
    return strip_prefix(state)


def convert_hps(state: dict, arch: dict, tokenizer) -> tuple[torch.nn.Module, dict]:
    """open_clip state dict -> (``CLIPModel``, mapping original key -> CLIPModel keys)."""
    dims = read_dims(state, "hpsv2")
    hf, mapping = convert_open_clip(state, "hpsv2")
    vcfg, tcfg = arch.get("vision_cfg", {}), arch.get("text_cfg", {})
    text_head_width = dims.text_width // int(tcfg["heads"]) if "heads" in tcfg else 64
    config = build_clip_config(dims, int(vcfg.get("head_width", 64)), text_head_width,
                               "quick_gelu" if arch.get("quick_gelu") else "gelu",
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return load_clip_model(hf, config, "hpsv2"), mapping


def find_checkpoint(name: str, checkpoint: str | os.PathLike | None) -> Path:
    """``name``'s own file: an explicit file (refused when it is the other version's), or the file of this
    version in an explicit folder / ``$MVZ_HOME/rewards/<name>/`` / ``$MVZ_HOME/rewards/hpsv2/`` /
    ``~/.cache/hpsv2`` / the HF cache."""
    filename = FILENAMES[name]
    if checkpoint is not None and Path(checkpoint).expanduser().is_file():
        given = Path(checkpoint).expanduser().name
        other = next((n for n, f in FILENAMES.items() if f == given and n != name), None)
        if other:
            raise InputError(f"{name}: {given} is the checkpoint of {other}, not of {name}.",
                             f"Use the reward name {other!r} for it, or pass {filename}.")
    source = f"https://huggingface.co/{HF_REPO} (file {filename}; the hpsv2 package caches it in ~/.cache/hpsv2)"
    extra = [rewards_dir() / "hpsv2"] if name != "hpsv2" else []
    return find_file(name, (filename,), checkpoint, [*extra, Path.home() / ".cache" / "hpsv2"],
                     [(HF_REPO, filename)], source)


class HPSv2(ClipPerViewReward):
    """HPS v2.0 (``HPS_v2_compressed.pt``); :class:`HPSv21` is v2.1."""

    name = "hpsv2"
    kind = "per_view"

    def __init__(self, checkpoint: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                 device=None, dtype=None, memory_budget_mb: float = 2048.0, max_batch: int | None = None):
        super().__init__(device, dtype, memory_budget_mb, max_batch)
        from transformers import CLIPTokenizer

        home = rewards_dir() / "hpsv2"
        path = find_checkpoint(self.name, checkpoint)
        tok_folder = find_folder("hpsv2", "vocab.json", "CLIP BPE tokenizer", tokenizer,
                                 list(dict.fromkeys([path.parent / "tokenizer", rewards_dir() / self.name / "tokenizer",
                                                     home / "tokenizer"])), TOKENIZER_REPOS,
                                 f"https://huggingface.co/{TOKENIZER_REPOS[0]}")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
        self.tokenizer.model_max_length = 10**9  # clip_tokenize cuts to the context itself (no HF length warning)
        state = hps_state_dict(load_torch_state(path, "hpsv2"))
        self.model, self.key_mapping = convert_hps(state, read_arch(path), self.tokenizer)
        self._init_clip(self.model)
        self.checkpoint = str(path)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, lengths = clip_tokenize(self.tokenizer, prompts, self.context_length)  # open_clip's ids, cleaning included
        self.notice_truncation(prompts, lengths, self.context_length)
        ids = ids.to(self.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # causal mask only, like open_clip
        eot = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]  # EOT has the largest id
        return F.normalize(self.model.text_projection(eot).float(), dim=-1)


class HPSv21(HPSv2):
    """HPS v2.1 (``HPS_v2.1_compressed.pt``): same architecture and score, other weights."""

    name = "hpsv2.1"


@register_reward("hpsv2")
def make_hpsv2(**kwargs) -> HPSv2:
    return HPSv2(**kwargs)


@register_reward("hpsv2.1")
def make_hpsv21(**kwargs) -> HPSv21:
    return HPSv21(**kwargs)
