"""Rewards for training: the per-view reward R and the joint reward R_mv, by registry name.

Also registers ``brightness``: mean pixel value per view, a simple verifiable reward for smoke tests
(``per_view`` ``[B, V]``, ``per_set`` = mean over views).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mvz.errors import ConfigError
from mvz.rewards.base import Reward, RewardOutput, register_reward


class BrightnessReward(Reward):
    name = "brightness"
    kind = "per_view"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        per_view = images.float().mean(dim=(2, 3, 4)).cpu()
        return RewardOutput(per_set=per_view.mean(dim=1), per_view=per_view)


@register_reward("brightness")
def make_brightness(**_: object) -> BrightnessReward:
    return BrightnessReward()


@dataclass
class TrainingRewards:
    view: Reward  # R: per_view [B, V]
    joint: Reward  # R_mv: per_set [B]
    view_name: str
    joint_name: str

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``view`` [B, V], ``joint`` [B], plus ``joint/<sub>`` sub-scores [B] for logging."""
        out_v = self.view.score(images, prompts)
        if out_v.per_view is None:
            raise ConfigError(f"reward.reward_fn {self.view_name!r} gives no per-view scores.",
                              "Use a per-view reward (pickscore, hpsv2, imagereward, brightness).")
        out_j = out_v if self.joint is self.view else self.joint.score(images, prompts)
        result = {"view": out_v.per_view.float().cpu(), "joint": out_j.per_set.float().cpu()}
        for name, val in out_j.sub_scores.items():
            if val.ndim == 1:
                result[f"joint/{name}"] = val.float().cpu()
        return result


def load_training_rewards(cfg, device: torch.device) -> TrainingRewards:
    """Build both rewards now, so a missing checkpoint fails before any sampling starts."""
    from mvz.rewards import load_reward
    from mvz.rewards.custom import is_custom_spec, load_custom_reward

    r = cfg.reward

    def build(name: str, checkpoint: str | None) -> Reward:
        if is_custom_spec(name):  # the user's callable, probed at the training views and size
            return load_custom_reward(name.strip(), views=cfg.training.num_views, size=cfg.training.resolution,
                                      device=device)
        return load_reward(name, checkpoint, preset=r.preset if checkpoint is None else None, device=device,
                           dtype=r.dtype)

    view = build(r.reward_fn, r.reward_checkpoint)
    same = r.mv_reward_fn.strip().lower() == r.reward_fn.strip().lower() and r.mv_reward_checkpoint == r.reward_checkpoint
    joint = view if same else build(r.mv_reward_fn, r.mv_reward_checkpoint)
    if getattr(view, "kind", "per_view") != "per_view":
        raise ConfigError(f"reward.reward_fn {r.reward_fn!r} is a per-set reward; R must be per view.",
                          "Use pickscore, hpsv2, imagereward or brightness for reward.reward_fn.")
    return TrainingRewards(view, joint, r.reward_fn, r.mv_reward_fn)
