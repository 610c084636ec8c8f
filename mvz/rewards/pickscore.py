"""PickScore: a Hugging Face CLIP folder (``yuvalkirstain/PickScore_v1``), per-view cosine score.

Score = cosine(L2-normalised image embedding, L2-normalised text embedding), **without** the
``logit_scale.exp()`` (~100) factor of the official demo, as MVC-ZigAL uses it (reference section 2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mvz.errors import CheckpointError
from mvz.paths import rewards_dir
from mvz.rewards.base import register_reward
from mvz.rewards.checkpoints import find_folder
from mvz.rewards.runtime import ClipPerViewReward
from mvz.state_dicts import load_strict

HF_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPOS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
SOURCE = f"https://huggingface.co/{HF_REPO} (processor: https://huggingface.co/{PROCESSOR_REPOS[0]})"


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_hf_weights(folder: Path, what: str) -> dict:
    """The state dict of a HF model folder (single or sharded safetensors / ``.bin``), on CPU."""
    from safetensors.torch import load_file

    from mvz.rewards.checkpoints import load_torch_state

    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        files = [path]
        if name.endswith(".index.json"):
            try:
                index = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{what}: cannot read {path}: {exc}.") from None
            files = [folder / f for f in sorted(set(index.values()))]
        state: dict = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{what}: weight shard {f} is missing.", "Download the complete folder.")
            try:
                state.update(load_file(str(f)) if f.suffix == ".safetensors" else load_torch_state(f, what))
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{what}: cannot read {f}: {str(exc)[:160]}.") from None
        return state
    raise CheckpointError(f"{what}: {folder} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])}).",
                          f"Download the weights from {SOURCE}.")


def load_clip_folder(folder: Path, what: str):
    """A HF ``CLIPModel`` folder, loaded strictly (other models and partial loads are errors)."""
    from transformers import CLIPConfig, CLIPModel

    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: cannot read {cfg_path}: {exc}.") from None
    if cfg.get("model_type") != "clip":
        raise CheckpointError(f"{what}: {folder} holds a {cfg.get('model_type')!r} model, not a CLIP model.",
                              f"Point it at a CLIP folder such as {HF_REPO}.")
    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    state = {k: v for k, v in read_hf_weights(folder, what).items() if not k.endswith("embeddings.position_ids")}
    model = CLIPModel(config)
    load_strict(model, state, f"{what}: {folder} (for its CLIP config)", "Is it a CLIPModel checkpoint?")
    return model.eval().requires_grad_(False)


class PickScore(ClipPerViewReward):
    name = "pickscore"
    kind = "per_view"

    def __init__(self, checkpoint: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                 device=None, dtype=None, memory_budget_mb: float = 2048.0, max_batch: int | None = None):
        super().__init__(device, dtype, memory_budget_mb, max_batch)
        from transformers import CLIPTokenizer

        home = rewards_dir() / "pickscore"
        folder = find_folder("pickscore", "config.json", "CLIP model folder", checkpoint, [home], [HF_REPO], SOURCE)
        self.model = load_clip_folder(folder, "pickscore")
        tok_folder = find_folder("pickscore", "vocab.json", "CLIP tokenizer", tokenizer, [folder, home / "processor"],
                                 PROCESSOR_REPOS, f"https://huggingface.co/{PROCESSOR_REPOS[0]}")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
        self._init_clip(self.model)
        self.checkpoint = str(folder)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenize_truncating(self.tokenizer, prompts, self.context_length)
        out = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)


@register_reward("pickscore")
def make_pickscore(**kwargs) -> PickScore:
    return PickScore(**kwargs)
