"""Load a reward by name: ``load_reward("pickscore", preset="tiny")``."""

from __future__ import annotations

import importlib
import os

from mvz.errors import InputError
from mvz.rewards.base import REWARD_REGISTRY, Reward

BUILTIN = {"pickscore": "mvz.rewards.pickscore", "hpsv2": "mvz.rewards.hpsv2", "hpsv2.1": "mvz.rewards.hpsv2",
           "imagereward": "mvz.rewards.imagereward", "hyperscore": "mvz.rewards.hyperscore"}
PRESETS = ("tiny",)


def available_rewards() -> list[str]:
    return sorted(set(BUILTIN) | set(REWARD_REGISTRY))


def _factory(name: str):
    if name in BUILTIN and name not in REWARD_REGISTRY:
        importlib.import_module(BUILTIN[name])  # registers itself
    if name not in REWARD_REGISTRY:
        raise InputError(f"unknown reward {name!r}.", f"Choose from {', '.join(available_rewards())}.")
    return REWARD_REGISTRY[name]


def load_reward(name: str, checkpoint: str | os.PathLike | None = None, *, preset: str | None = None,
                device=None, dtype=None, **kwargs) -> Reward:
    """Build reward ``name``.

    ``checkpoint``: explicit file/folder; default looks in ``$MVZ_HOME/rewards/<name>/`` then the HF cache.
    ``preset="tiny"``: random tiny weights in the original format under ``$MVZ_HOME/rewards/tiny/<name>``
    (written on first use). ``device`` (default: cuda if available), ``dtype`` (default fp32) and any
    reward-specific keyword (``max_batch``, ``memory_budget_mb``, HyperScore ``views``/``white_background``)
    are passed through. Custom rewards registered with ``register_reward`` get ``**kwargs`` only; a
    ``module:callable`` / ``file.py:callable`` name loads the user's callable (:mod:`mvz.rewards.custom`).
    """
    from mvz.rewards.custom import is_custom_spec, load_custom_reward

    if is_custom_spec(name):  # module:callable or file.py:callable, checked on a probe batch now
        return load_custom_reward(name.strip(), device=device)
    name = name.strip().lower()
    factory = _factory(name)
    if name not in BUILTIN:
        return factory(**kwargs)
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown reward preset {preset!r}.", f"Use one of {', '.join(PRESETS)} or none.")
        if checkpoint is not None:
            raise InputError("pass either a reward checkpoint or a preset, not both.")
        from mvz.rewards.tiny import ensure_tiny

        checkpoint = ensure_tiny(name)
    return factory(checkpoint=checkpoint, device=device, dtype=dtype, **kwargs)


get_reward = load_reward
