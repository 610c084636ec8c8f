"""Reward models behind one interface (see ``mvz.rewards.base``)."""

from mvz.rewards.base import REWARD_REGISTRY, Reward, RewardOutput, register_reward

__all__ = ["REWARD_REGISTRY", "Reward", "RewardOutput", "register_reward"]
