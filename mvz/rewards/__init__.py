"""Reward models behind one interface (see ``mvz.rewards.base``).

``load_reward(name, checkpoint=None, preset=None, device=None, dtype=None, **kw)`` builds one of
``pickscore``, ``hpsv2`` (v2.0), ``hpsv2.1``, ``imagereward``, ``hyperscore`` (``preset="tiny"`` for random tiny weights).
Heavy modules (transformers) load only when a reward is built.
"""

from mvz.rewards.base import REWARD_REGISTRY, Reward, RewardOutput, register_reward
from mvz.rewards.registry import available_rewards, get_reward, load_reward

__all__ = ["REWARD_REGISTRY", "Reward", "RewardOutput", "available_rewards", "get_reward", "load_reward",
           "register_reward"]
