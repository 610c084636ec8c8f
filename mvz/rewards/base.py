"""The reward interface shared by training, scoring and benchmarks.

A reward takes a batch of multiview sets, images ``[B, V, 3, H, W]`` float in [0, 1], and their ``B``
prompts, and returns a :class:`RewardOutput`:

* per-view rewards (PickScore, HPSv2, ImageReward) fill ``per_view`` ``[B, V]`` and set ``per_set`` to the
  mean over views;
* per-set rewards (HyperScore) fill ``per_set`` ``[B]`` (the headline score, e.g. HyperScore "overall")
  and ``per_view`` is None;
* ``sub_scores`` holds named extra scores (HyperScore: alignment, geometry, texture, overall), each ``[B]``
  or ``[B, V]``.

Rewards are frozen, run without gradients, and batch internally to a memory budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class RewardOutput:
    per_set: torch.Tensor  # [B] float32, on CPU
    per_view: torch.Tensor | None = None  # [B, V] float32, on CPU, or None for set-level rewards
    sub_scores: dict[str, torch.Tensor] = field(default_factory=dict)


class Reward:
    """Base class. Subclasses set ``name`` and ``kind`` and implement :meth:`score`."""

    name: ClassVar[str] = "reward"
    kind: ClassVar[str] = "per_view"  # "per_view" | "per_set"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        return self.score(images, prompts)


# name -> factory(**kwargs) -> Reward. Filled by mvz.rewards modules and by callers (e.g. tests,
# or a custom reward such as mean brightness for a verifiable training check).
REWARD_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        REWARD_REGISTRY[name] = factory
        return factory

    return deco
