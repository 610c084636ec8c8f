"""λ/τ edge cases as upstream's trainer reads them: τ's EMA moves during the λ delay, lambda_max 0/null = no cap."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.errors import ConfigError
from mvz.train.advantages import LagrangianState
from mvz.train.config import load_config


def test_tau_moves_while_lambda_waits():
    lag = LagrangianState(lam=1.0, tau=0.0)
    lag.update(7.0, 0.1, 5.0, 0.99, update_lambda=False)  # first iteration: τ ← m even during the delay
    assert (lag.tau, lag.lam) == (7.0, 1.0)
    lag.update(6.0, 0.1, 5.0, 0.99, update_lambda=False)  # τ ← .99·7 + .01·6; λ untouched
    assert lag.tau == pytest.approx(6.99) and lag.lam == 1.0
    lag.update(5.0, 0.1, 5.0, 0.99)  # delay over: τ first (.99·6.99 + .05), then λ with the new τ (violated: lr 0.1)
    tau = 0.99 * 6.99 + 0.01 * 5.0
    assert lag.tau == pytest.approx(tau)
    assert lag.lam == pytest.approx(1.0 + 0.1 * (tau - 5.0))


@pytest.mark.parametrize("cap", [0.0, None])
def test_lambda_max_zero_or_null_means_no_cap(cap):
    lag = LagrangianState(lam=4.95, tau=9.0)
    lag.update(1.0, 0.1, cap, 0.99)  # deep violation: would clamp at 5 with a cap of 5
    tau = 0.99 * 9.0 + 0.01
    assert lag.lam == pytest.approx(4.95 + 0.1 * (tau - 1.0)) and lag.lam > 5.0
    capped = LagrangianState(lam=4.95, tau=9.0).update(1.0, 0.1, 5.0, 0.99)
    assert capped.lam == 5.0
    floor = LagrangianState(lam=0.01, tau=1.0).update(100.0, 0.1, cap, 0.99)
    assert floor.lam == 0.0  # the lower clamp at 0 stays


def test_lambda_max_config():
    assert load_config("tiny", overrides=["training.lambda_max=0"]).training.lambda_max == 0.0
    cfg = load_config("tiny", overrides=["training.lambda_max=null", "training.lambda_init=7"])
    assert cfg.training.lambda_max is None and cfg.training.lambda_init == 7.0  # no cap: any λ_init is fine
    assert load_config("tiny", overrides=["training.lambda_max=0", "training.lambda_init=7"]).training.lambda_init == 7.0
    for bad in (["training.lambda_max=-1"], ["training.lambda_max=2", "training.lambda_init=3"]):
        with pytest.raises(ConfigError):
            load_config("tiny", overrides=bad)


def test_trainer_moves_tau_during_lambda_delay(tmp_path, tiny_model):
    from mvz.train.trainer import Trainer

    overrides = ["reward.reward_fn=brightness", "reward.mv_reward_fn=brightness", "reward.preset=null",
                 "logging.tensorboard=false", "logging.sample_grid=false", "training.num_epochs=1",
                 "training.batches_per_epoch=2", "training.lambda_update_delay_steps=1", "training.lambda_init=1.0"]
    cfg = load_config("tiny", overrides=overrides)
    tr = Trainer(cfg, tmp_path / "run", device="cpu", model=copy.deepcopy(tiny_model), echo=lambda m: None).setup()
    tr.train()
    first, second = tr.run.read_metrics()

    def joint_mean(rec):  # both trajectories hold the same number of sets, so m is the mean of the two means
        return (rec["reward/standard/joint_mean"] + rec["reward/zmv/joint_mean"]) / 2

    m0, m1 = joint_mean(first), joint_mean(second)
    assert m0 != pytest.approx(m1, abs=1e-9)
    assert first["tau"] == pytest.approx(m0, rel=1e-6)
    assert second["tau"] == pytest.approx(0.99 * m0 + 0.01 * m1, rel=1e-6)
    assert first["lambda"] == second["lambda"] == 1.0  # epoch 0 < delay 1: λ waits
    assert torch.isfinite(torch.tensor(second["loss"]))
