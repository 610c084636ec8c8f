"""MVC-ZigAL training: rollouts, advantages, Lagrangian, loss, trainer, configs and presets.

``mvz train`` drives :class:`~mvz.train.trainer.Trainer`; the maths lives in
:mod:`mvz.train.advantages` and :mod:`mvz.train.loss` (pure functions, tested against hand-computed cases).
"""

from mvz.train import rewards as _rewards  # noqa: F401  (registers the built-in ``brightness`` reward)
from mvz.train.advantages import LagrangianState, delta_target, pooled_advantages, single_advantages, zscore
from mvz.train.config import TrainConfig, available_presets, load_config
from mvz.train.loss import clipped_regression_loss, ppo_clipped_loss

__all__ = ["LagrangianState", "TrainConfig", "available_presets", "clipped_regression_loss", "delta_target",
           "load_config", "pooled_advantages", "ppo_clipped_loss", "single_advantages", "zscore"]
