"""The trainer wires the maths together as the reference says: checked on one short tiny run with spies.

* the configured clip range reaches the loss the trainer calls;
* the gradients applied at each optimiser step are the gradient of the mean loss of the k micro-steps that
  preceded it (the accumulation divisor), computed here in one autograd call over that batch;
* λ rises above 0 once the joint reward falls below τ, by ``lambda_lr·(τ − m)`` (the configured rate);
* the target Δ the micro-steps regress on is the pooled z-score formula written out here in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

import mvz.train.trainer as trainer_mod
from mvz.rewards.base import RewardOutput, register_reward
from mvz.train.config import load_config
from mvz.train.rewards import BrightnessReward
from mvz.train.trainer import Trainer

CLIP, LAMBDA_LR, GA = 2.5e-4, 0.37, 2


class FallingJointReward(BrightnessReward):
    """R_mv = brightness + 5 for the first iteration's two rollouts, + 4 afterwards: the joint reward
    drops below the threshold τ set by the first iteration."""

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        out = super().score(images, prompts)
        offset = 5.0 if self.calls < 2 else 4.0
        self.calls += 1
        return RewardOutput(per_set=out.per_set + offset, per_view=out.per_view)


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory, tiny_model):
    register_reward("falling_joint_test")(lambda **_: FallingJointReward())
    cfg = load_config("tiny", overrides=[
        "reward.reward_fn=brightness", "reward.mv_reward_fn=falling_joint_test", "reward.preset=null",
        "logging.tensorboard=false", "logging.sample_grid=false", "training.num_epochs=1",
        "training.batches_per_epoch=2", "training.num_inference_steps=2", f"training.gradient_accumulation_steps={GA}",
        f"training.clip_range={CLIP}", f"training.lambda_lr={LAMBDA_LR}", "training.max_grad_norm=1e9",
        "training.lr=1e-2",
    ])
    tr = Trainer(cfg, tmp_path_factory.mktemp("plumb") / "run", device="cpu", model=copy.deepcopy(tiny_model),
                 echo=lambda m: None).setup()
    rec = {"clip": [], "rewards": [], "targets": [], "steps": []}
    real_loss, real_micro, real_train_on, real_score = (trainer_mod.clipped_regression_loss, tr.micro_loss,
                                                        tr.train_on, tr.rewards.score)
    pending: list[tuple[int, int]] = []
    current: dict = {}

    def loss_spy(*args, **kwargs):
        rec["clip"].append(args[5] if len(args) > 5 else kwargs["clip_range"])
        return real_loss(*args, **kwargs)

    def micro_spy(roll, target, p, j):
        pending.append((p, j))
        return real_micro(roll, target, p, j)

    def train_on_spy(roll, target, *args):
        current.update(roll=roll, target=target)
        rec["targets"].append(target.clone())
        return real_train_on(roll, target, *args)

    def score_spy(images, prompts):
        out = real_score(images, prompts)
        rec["rewards"].append({k: v.clone() for k, v in out.items()})
        return out

    real_step = tr.optimizer.step

    def step_spy(*args, **kwargs):
        applied = [p.grad.detach().clone() for p in tr.params]
        batch = list(pending)
        pending.clear()
        losses = [real_micro(current["roll"], current["target"], p, j).loss for p, j in batch]
        full = torch.autograd.grad(torch.stack(losses).mean(), tr.params, allow_unused=True)
        rec["steps"].append((batch, applied, [torch.zeros_like(p) if g is None else g for p, g in zip(tr.params, full, strict=True)]))
        return real_step(*args, **kwargs)

    trainer_mod.clipped_regression_loss = loss_spy
    tr.micro_loss, tr.train_on, tr.rewards.score, tr.optimizer.step = micro_spy, train_on_spy, score_spy, step_spy
    try:
        tr.train()
    finally:
        trainer_mod.clipped_regression_loss = real_loss
    return tr, rec


def test_clip_range_reaches_the_loss(spied_run):
    tr, rec = spied_run
    # 2 iterations x 2 prompts x 2 timesteps, each seen twice (the trainer's call and the spy's reference)
    assert len(rec["clip"]) == 2 * (2 * 2 * 2)
    assert set(rec["clip"]) == {CLIP}


def test_applied_gradient_is_the_mean_over_the_accumulated_micro_steps(spied_run):
    _, rec = spied_run
    assert len(rec["steps"]) == 2 * 2 * 2 // GA
    for batch, applied, full in rec["steps"]:
        assert len(batch) == GA
        assert any(g.abs().max() > 0 for g in full)
        for a, f in zip(applied, full, strict=True):
            torch.testing.assert_close(a, f, rtol=1e-4, atol=1e-9)


def test_lambda_rises_when_the_joint_reward_falls_below_tau(spied_run):
    tr, _ = spied_run
    first, second = tr.run.read_metrics()
    assert first["lambda"] == 0.0 and first["tau"] == pytest.approx(first["reward/joint_mean"], rel=1e-6)
    m, tau = second["reward/joint_mean"], second["tau"]
    assert m < tau
    assert second["lambda_before"] == 0.0
    assert second["lambda"] == pytest.approx(LAMBDA_LR * (tau - m), rel=1e-5)
    assert second["lambda"] > 0.3


def hand_delta(std: dict, zmv: dict, lam: float) -> np.ndarray:
    """Δ_v = [(Â^s_v − Â^z_v) + λ(Â^{mv,s} − Â^{mv,z})]/(1+λ), z-scores over the pooled batch (population std)."""
    rv = np.concatenate([std["view"].double().numpy(), zmv["view"].double().numpy()])
    rj = np.concatenate([std["joint"].double().numpy(), zmv["joint"].double().numpy()])
    av = (rv - rv.mean()) / (rv.std() + 1e-8)
    aj = (rj - rj.mean()) / (rj.std() + 1e-8)
    p = std["view"].shape[0]
    d_view = av[:p] - av[p:]
    d_mv = (aj[:p] - aj[p:])[:, None]
    return (d_view + lam * d_mv) / (1 + lam)


def test_target_is_the_pooled_lagrangian_delta(spied_run):
    tr, rec = spied_run
    metrics = tr.run.read_metrics()
    assert len(rec["rewards"]) == 4 and len(rec["targets"]) == 2
    for it in range(2):
        std, zmv = rec["rewards"][2 * it], rec["rewards"][2 * it + 1]
        want = hand_delta(std, zmv, metrics[it]["lambda"])
        np.testing.assert_allclose(rec["targets"][it].double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert metrics[1]["lambda"] > 0  # the second target mixes in the multiview share
