"""MVC-ZigAL maths against hand-computed cases: advantages, Lagrangian, Δ, losses and their clipping; configs."""

from __future__ import annotations

import math

import pytest
import torch

from mvz.errors import ConfigError
from mvz.train.advantages import LagrangianState, delta_target, pooled_advantages, single_advantages, zscore
from mvz.train.config import load_config
from mvz.train.loss import clipped_regression_loss, ppo_clipped_loss


def test_zscore_population_std():
    z = zscore(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(1.25)
    assert torch.allclose(z, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-8), atol=1e-7)


def test_pooled_advantages_and_delta_by_hand():
    r_s = torch.tensor([[1.0, 2.0]])  # P = 1 prompt, V = 2 views
    r_z = torch.tensor([[3.0, 4.0]])
    adv = pooled_advantages(r_s, r_z, torch.tensor([1.0]), torch.tensor([3.0]))
    s = math.sqrt(1.25)
    assert torch.allclose(adv.view_s, torch.tensor([[-1.5, -0.5]]) / s, atol=1e-6)
    assert torch.allclose(adv.view_z, torch.tensor([[0.5, 1.5]]) / s, atol=1e-6)
    # joint rewards pooled over the 2 sets: mean 2, std 1 -> -1, +1, broadcast to both views
    assert torch.allclose(adv.mv_s, torch.tensor([[-1.0, -1.0]]), atol=1e-6)
    assert torch.allclose(adv.mv_z, torch.tensor([[1.0, 1.0]]), atol=1e-6)
    d_view = -2.0 / s
    # constrained, lambda = 1: [(A_s - A_z) + 1*(A_mv_s - A_mv_z)] / 2
    assert torch.allclose(delta_target(adv, "constrained", lam=1.0), torch.full((1, 2), (d_view - 2.0) / 2), atol=1e-6)
    # lambda = 0 is pure per-view; lambda = 4 weights the multiview share 4/5
    assert torch.allclose(delta_target(adv, "constrained", lam=0.0), torch.full((1, 2), d_view), atol=1e-6)
    assert torch.allclose(delta_target(adv, "constrained", lam=4.0), torch.full((1, 2), (d_view - 8.0) / 5), atol=1e-6)
    assert torch.allclose(delta_target(adv, "weighted", weight=0.5), torch.full((1, 2), d_view - 1.0), atol=1e-6)
    assert torch.allclose(delta_target(adv, "joint"), torch.full((1, 2), -2.0), atol=1e-6)
    assert torch.allclose(delta_target(adv, "per_view"), torch.full((1, 2), d_view), atol=1e-6)


def test_pooled_advantages_pool_over_all_prompts():
    torch.manual_seed(0)
    r_s, r_z = torch.randn(3, 6), torch.randn(3, 6)
    adv = pooled_advantages(r_s, r_z, torch.randn(3), torch.randn(3))
    allv = torch.cat([adv.view_s, adv.view_z])
    assert abs(allv.mean().item()) < 1e-6 and abs(allv.std(unbiased=False).item() - 1) < 1e-5
    assert torch.equal(adv.mv_s[:, 0:1].expand(-1, 6), adv.mv_s)


def test_single_advantages_clip():
    a = single_advantages(torch.tensor([[0.0, 0.0, 0.0, 100.0]]), torch.tensor([1.0]), "per_view", clip_max=1.0)
    assert a.max().item() == 1.0 and a.min().item() < 0


def test_lagrangian_by_hand():
    lag = LagrangianState(lam=0.0, tau=0.0)
    lag.update(7.0, lambda_lr=0.1, lambda_max=5.0, ema_beta=0.99)  # first iteration: tau <- m, no violation
    assert lag.tau == 7.0 and lag.lam == 0.0
    lag.update(6.0, 0.1, 5.0, 0.99)  # tau = .99*7 + .01*6 = 6.99 (EMA before lambda); violated: lr 0.1
    assert lag.tau == pytest.approx(6.99)
    assert lag.lam == pytest.approx(0.1 * 0.99)
    lag.update(8.0, 0.1, 5.0, 0.99)  # tau = .99*6.99 + .08 = 7.0001; satisfied: lr 0.01, lambda decreases
    assert lag.tau == pytest.approx(7.0001)
    assert lag.lam == pytest.approx(0.099 + 0.01 * (7.0001 - 8.0))
    lag.update(100.0, 0.1, 5.0, 0.99)  # big surplus: clamp at 0
    assert lag.lam == 0.0
    big = LagrangianState(lam=4.95, tau=9.0)
    big.update(1.0, 0.1, 5.0, 0.99)  # deep violation: clamp at lambda_max
    assert big.lam == 5.0 and big.tau == pytest.approx(0.99 * 9 + 0.01)


def _leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def test_regression_loss_value_and_clip_gradient():
    eps = 1e-4
    old_s, old_z = torch.zeros(3), torch.zeros(3)
    # view 0: inside the trust region; view 1: s moved 3e-4 towards the target (clip active);
    # view 2: s moved 3e-4 away from the target (clip inactive: the unclipped term is larger)
    logp_s = _leaf([5e-5, 3e-4, 3e-4])
    logp_z = _leaf([0.0, 0.0, 0.0])
    delta = torch.tensor([1.0, 1.0, -1.0])
    out = clipped_regression_loss(logp_s, old_s, logp_z, old_z, delta, eps)
    expected = ((5e-5 - 1) ** 2 + (1e-4 - 1) ** 2 + (3e-4 + 1) ** 2) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    g_s, g_z = logp_s.grad, logp_z.grad
    assert g_s[0].item() == pytest.approx(2 * (5e-5 - 1) / 3, rel=1e-5)
    assert g_s[1].item() == 0.0  # clip active: no gradient through the moved log-prob
    assert g_z[1].item() == pytest.approx(-2 * (1e-4 - 1) / 3, rel=1e-5)  # z still inside its range
    assert g_s[2].item() == pytest.approx(2 * (3e-4 + 1) / 3, rel=1e-5)
    assert out.clipfrac.item() == pytest.approx(2 / 6)
    assert out.approx_kl.item() == pytest.approx(0.5 * (5e-5**2 + 2 * 9e-8) / 6, rel=1e-4)


def test_regression_loss_all_clipped_has_zero_gradient():
    logp_s = _leaf([1e-3, 2e-3])
    logp_z = _leaf([-1e-3, -2e-3])
    out = clipped_regression_loss(logp_s, torch.zeros(2), logp_z, torch.zeros(2), torch.tensor([5.0, 5.0]), 1e-4)
    out.loss.backward()
    assert torch.count_nonzero(logp_s.grad) == 0 and torch.count_nonzero(logp_z.grad) == 0
    assert out.loss.item() == pytest.approx((2e-4 - 5) ** 2, rel=1e-6)


def test_ppo_loss_clip():
    logp = _leaf([0.0, 1e-3])
    out = ppo_clipped_loss(logp, torch.zeros(2), torch.tensor([1.0, 1.0]), 1e-4)
    out.loss.backward()
    assert logp.grad[0].item() == pytest.approx(-0.5)  # -A*ratio/2 at ratio 1
    assert logp.grad[1].item() == 0.0  # ratio beyond 1+eps with A > 0: clipped
    assert out.loss.item() == pytest.approx(-(1.0 + (1 + 1e-4)) / 2, rel=1e-6)


def test_presets_reproduce_upstream_values():
    simple = load_config("lcm_sdxl_simple")
    t = simple.training
    assert (t.lr, t.gradient_accumulation_steps, t.num_epochs, t.sample_batch_size_per_gpu, t.num_sample_iters) == (1e-4, 32, 70, 4, 1)
    assert (t.lora_rank, t.lora_alpha, t.clip_range, t.max_grad_norm, t.weight_decay) == (16, 16, 1e-4, 5.0, 1e-4)
    assert (t.lambda_init, t.lambda_lr, t.lambda_max, t.ema_beta, t.constrain_threshold_init) == (0.0, 0.1, 5.0, 0.99, 0.0)
    assert (t.num_inference_steps, t.guidance_scale, t.resolution, t.num_views, t.seed, t.batches_per_epoch) == (8, 7.0, 768, 6, 42, 10)
    assert simple.prompts.prompt_set == "simple_animals" and simple.objective == "constrained"
    assert (simple.reward.reward_fn, simple.reward.mv_reward_fn) == ("pickscore", "hyperscore")
    mate = load_config("lcm_sdxl_mate3d").training
    assert (mate.lr, mate.gradient_accumulation_steps, mate.num_epochs, mate.num_sample_iters) == (5e-5, 64, 100, 4)
    assert load_config("tiny").model.name == "tiny"


def test_config_errors_and_overrides():
    cfg = load_config("tiny", overrides=["training.lr=5e-5", "logging.sample_prompts=[a, b]", "training.lora_alpha=null"])
    assert cfg.training.lr == 5e-5 and cfg.logging.sample_prompts == ["a", "b"] and cfg.training.lora_alpha is None
    for bad in (["training.nope=1"], ["nosection.lr=1"], ["training.lr=abc"], ["training.num_epochs=1.5"],
                ["training.gradient_checkpointing=maybe"], ["training.method=ppo"], ["training.lr"], ["training=3"],
                ["training.lr=nan"], ["training.lambda_max=.inf"], ["training.lora_alpha=nan"]):
        with pytest.raises(ConfigError):
            load_config("tiny", overrides=bad)
    with pytest.raises(ConfigError):
        load_config("no_such_preset")
