"""Shared machinery for the model-backed rewards: device/dtype, memory-budgeted chunking, notices."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from mvz.devices import resolve_device, resolve_dtype
from mvz.rewards.base import Reward, RewardOutput
from mvz.rewards.preprocess import check_images, clip_preprocess

log = logging.getLogger("mvz.rewards")

def images_per_chunk(memory_budget_mb: float, tokens: int, width: int, heads: int, dtype: torch.dtype) -> int:
    """How many images fit one forward in ``memory_budget_mb`` of activations (rough, no-grad estimate)."""
    bytes_per = torch.finfo(dtype).bits // 8
    per_image = bytes_per * (tokens * width * 8 + heads * tokens * tokens * 2)
    return max(1, int(memory_budget_mb * 2**20 // max(per_image, 1)))


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class ModelReward(Reward):
    """A frozen torch-backed reward: holds device, dtype, chunk size and one-time notices."""

    def __init__(self, device=None, dtype=None, memory_budget_mb: float = 2048.0, max_batch: int | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, auto=torch.float32)  # upstream runs rewards in fp32
        self.memory_budget_mb = float(memory_budget_mb)
        self._max_batch = max_batch
        self.notices: list[str] = []
        self.checkpoint: str = ""

    def notice_once(self, message: str) -> None:
        """Record (and log) a user-facing notice, once per reward instance."""
        if message not in self.notices:
            self.notices.append(message)
            log.warning(message)

    def _setup_modules(self, *modules: torch.nn.Module) -> None:
        for m in modules:
            m.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def chunk_size(self, tokens: int, width: int, heads: int) -> int:
        if self._max_batch is not None:
            return max(1, int(self._max_batch))
        return images_per_chunk(self.memory_budget_mb, tokens, width, heads, self.dtype)

    def map_chunks(self, n: int, size: int, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        return torch.cat([fn(s).float().cpu() for s in chunks(n, size)], dim=0)

    def notice_truncation(self, texts: Sequence[str], lengths: Sequence[int], max_length: int,
                          how: str = "like the original") -> None:
        """Say once per prompt that was cut to ``max_length`` tokens."""
        for text, n in zip(texts, lengths, strict=True):
            if n > max_length:
                short = text if len(text) <= 40 else text[:37] + "..."
                self.notice_once(f"{self.name}: prompt {short!r} has {n} tokens; truncated to {max_length} {how}.")

    def tokenize_truncating(self, tokenizer, texts: Sequence[str], max_length: int, **kwargs):
        """Tokenize with truncation to ``max_length`` tokens; say once when a prompt was cut."""
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt", **kwargs)
        full = tokenizer(list(texts), truncation=True, max_length=100_000, **kwargs)["input_ids"]
        self.notice_truncation(texts, [len(ids) for ids in full], max_length)
        return enc


class ClipPerViewReward(ModelReward):
    """A per-view CLIP-style reward (PickScore, HPSv2): cosine of the L2-normalised image and text embeddings.

    Subclasses load a transformers ``CLIPModel``, hand it to :meth:`_init_clip` (kept as ``self.model``) and implement
    :meth:`embed_text` (``[B, E]``, normalised); images go through the CLS-pooled vision tower, the visual
    projection and normalisation here, resized to the ViT size (bicubic) with CLIP mean/std.
    """

    def _init_clip(self, model) -> None:
        self.model = model
        self._setup_modules(model)
        vc = model.config.vision_config
        self.image_size = int(vc.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self._tokens = (self.image_size // vc.patch_size) ** 2 + 1
        self._width, self._heads = vc.hidden_size, vc.num_attention_heads

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, flat: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> normalised image embeddings ``[N, E]`` (float32, CPU)."""

        def run(s: slice) -> torch.Tensor:
            px = clip_preprocess(flat[s].to(self.device), self.image_size).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=px).pooler_output  # post_layernorm(CLS) = ln_post
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

        return self.map_chunks(flat.shape[0], self.chunk_size(self._tokens, self._width, self._heads), run)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        b, v = check_images(images, prompts, self.name)
        img = self.embed_images(images.reshape(b * v, *images.shape[2:])).reshape(b, v, -1)
        txt = self.embed_text(prompts).cpu()
        per_view = (img * txt[:, None, :]).sum(-1)
        return RewardOutput(per_set=per_view.mean(1), per_view=per_view)
