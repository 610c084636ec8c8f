"""Training on the tiny model (CPU): log-prob recompute, a verifiable reward rises, exact resume, LoRA files."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.train.config import load_config
from mvz.train.run import PROGRESS_FILE
from mvz.train.trainer import Trainer, iteration_rng

FAST = ["reward.reward_fn=brightness", "reward.mv_reward_fn=brightness", "reward.preset=null",
        "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def tiny_model():
    from mvz.models.loading import load_model

    return load_model("tiny", device="cpu", dtype="fp32")


def make_trainer(tmp_path, model, overrides=(), name="run", **kw) -> Trainer:
    cfg = load_config("tiny", overrides=[*FAST, *overrides])
    return Trainer(cfg, tmp_path / name, device="cpu", model=copy.deepcopy(model), echo=lambda m: None, **kw)


def test_recomputed_log_probs_equal_recorded(tmp_path, tiny_model):
    tr = make_trainer(tmp_path, tiny_model, ["logging.sample_grid=false"]).setup()
    calls = []
    sample = tr.pipeline.sample

    def spy(prompts, seeds, **kw):
        calls.append((list(seeds), kw))
        return sample(prompts, seeds, **kw)

    tr.pipeline.sample = spy
    roll = tr.rollout(iteration_rng(0, 0, 0, 0))
    from mvz.pipeline import recompute_log_probs

    assert len(roll.trajectories) == 2
    std, zmv = roll.trajectories
    # the ZMV partner starts from the standard rollout's x_T and draws its step noise from other generators
    (seeds, kw_std), (seeds_z, kw_zmv) = calls
    assert not kw_std.get("zmv") and kw_zmv["zmv"] and seeds_z == seeds
    assert torch.equal(kw_zmv["initial_latents"], std.states[:, 0])
    assert kw_zmv["noise_seeds"] is not None and set(kw_zmv["noise_seeds"]).isdisjoint(seeds)
    assert not torch.equal(zmv.states[:, 0], std.states[:, 0])  # ZMV records the inverted latent at step 0
    v = tr.cfg.training.num_views
    target = torch.zeros(roll.num_prompts, v)
    for p in (0,):
        for j in range(len(tr.schedule)):
            out = tr.micro_loss(roll, target, p, j)  # the training path: both trajectories in one call
            assert out.approx_kl.item() < 1e-10
            assert out.clipfrac.item() == 0.0
    # and with another batch composition (all rows at once), within float tolerance
    for traj in roll.trajectories:
        for j in range(len(tr.schedule)):
            lp = recompute_log_probs(tr.train_denoiser, torch.float32, traj.states[:, j], traj.next_states[:, j],
                                     traj.timesteps[j], traj.prev_timesteps[j], roll.cond, tr.alphas)
            assert torch.allclose(lp, traj.log_probs[:, j], atol=1e-5, rtol=0)


def _eval_brightness(tr: Trainer) -> float:
    with torch.no_grad():
        out = tr.pipeline.sample(["cat", "dog", "horse", "fish"], [100, 101, 102, 103], steps=4, height=64, width=64)
    return out.images.mean().item()


def test_brightness_reward_rises(tmp_path, tiny_model):
    # 8 iterations x 8 micro-steps; a high LR so the tiny random model moves within a CPU test budget
    tr = make_trainer(tmp_path, tiny_model, ["training.lr=3e-2", "training.batches_per_epoch=8", "training.num_epochs=1",
                                             "logging.sample_grid=false"]).setup()
    before = _eval_brightness(tr)
    tr.train()
    after = _eval_brightness(tr)
    metrics = tr.run.read_metrics()
    assert len(metrics) == 8
    first = sum(m["reward/standard/view_mean"] for m in metrics[:2]) / 2
    last = sum(m["reward/standard/view_mean"] for m in metrics[-2:]) / 2
    # fixed eval seeds: the per-set std of brightness is ~0.003, untrained drift is 0
    assert after - before > 0.003, (before, after)
    assert last > first, (first, last)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def _lora(run_dir, epoch):
    from safetensors.torch import load_file

    return load_file(str(run_dir / f"epoch_{epoch}" / "mvczigal_lcm_sdxl_lora.safetensors"))


def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_model):
    # optimiser steps that straddle prompts (3 prompts x 2 steps, GA 3); 2 sampling steps to stay fast
    over = ["training.gradient_accumulation_steps=3", "training.num_inference_steps=2",
            "training.sample_batch_size_per_gpu=3"]
    full = make_trainer(tmp_path, tiny_model, over, name="full")
    full.train()

    class Killed(Exception):
        pass

    def kill(info):
        if info["epoch"] == 1 and info["micro"] == 3:
            raise Killed

    cut = make_trainer(tmp_path, tiny_model, over, name="cut", hooks={"micro_step": kill})
    with pytest.raises(Killed):
        cut.train()
    assert (tmp_path / "cut" / "epoch_0").is_dir() and not (tmp_path / "cut" / "epoch_1").exists()
    cfg = load_config("tiny", overrides=[*FAST, *over])
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, device="cpu", model=copy.deepcopy(tiny_model), echo=lambda m: None)
    resumed.setup()
    assert resumed.start_epoch == 1
    resumed.train()
    a, b = _lora(tmp_path / "full", 1), _lora(tmp_path / "cut", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    sa = torch.load(tmp_path / "full" / "epoch_1" / PROGRESS_FILE, weights_only=False)
    sb = torch.load(tmp_path / "cut" / "epoch_1" / PROGRESS_FILE, weights_only=False)
    assert sa["lagrangian"] == sb["lagrangian"] and sa["global_step"] == sb["global_step"] == 4
    ma, mb = full.run.read_metrics(), resumed.run.read_metrics()
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert (tmp_path / "cut" / "samples" / "epoch_1.png").is_file()


@pytest.mark.parametrize("method", ["mv_rdl", "mv_pg", pytest.param("ws_zigal", marks=pytest.mark.slow),
                                    pytest.param("mv_zigal", marks=pytest.mark.slow)])
def test_baselines_run(tmp_path, tiny_model, method):
    tr = make_trainer(tmp_path, tiny_model, [f"training.method={method}", "training.num_epochs=1",
                                             "training.num_inference_steps=2", "training.gradient_accumulation_steps=4",
                                             "logging.sample_grid=false"])
    tr.train()
    m = tr.run.read_metrics()[-1]
    assert m["optimizer_steps"] == 1 and m["lambda"] == 0.0
    assert ("reward/zmv/view_mean" in m) == (method in ("ws_zigal", "mv_zigal"))
    assert ("reward/standard2/view_mean" in m) == (method == "mv_rdl")


def test_nan_reward_stops_with_message(tmp_path, tiny_model):
    from mvz.errors import TrainingDivergedError
    from mvz.rewards.base import RewardOutput, register_reward
    from mvz.train.rewards import BrightnessReward

    class NanReward(BrightnessReward):
        def score(self, images, prompts):
            out = super().score(images, prompts)
            return RewardOutput(per_set=out.per_set * float("nan"), per_view=out.per_view)

    register_reward("nan_joint_test")(lambda **_: NanReward())
    tr = make_trainer(tmp_path, tiny_model, ["reward.mv_reward_fn=nan_joint_test", "logging.sample_grid=false"])
    with pytest.raises(TrainingDivergedError, match="NaN/inf.*no checkpoint"):
        tr.train()


def test_nan_loss_stops_before_the_optimizer_step(tmp_path, tiny_model):
    from mvz.errors import TrainingDivergedError

    tr = make_trainer(tmp_path, tiny_model, ["logging.sample_grid=false"]).setup()
    before = [p.detach().clone() for p in tr.params]
    real = tr.micro_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    tr.micro_loss = nan_loss
    with pytest.raises(TrainingDivergedError, match="the loss became NaN/inf"):
        tr.train()
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, tr.params, strict=True)), "NaN step was applied"


def test_saved_lora_loads_in_mvz_and_peft(tmp_path, tiny_model):
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from mvz.models.loading import load_model
    from mvz.models.lora import LORA_FILENAME, add_lora, lora_config

    tr = make_trainer(tmp_path, tiny_model, ["training.num_epochs=1", "training.lr=1e-2", "logging.sample_grid=false"])
    tr.train()
    path = tmp_path / "run" / "epoch_0" / LORA_FILENAME
    sd = load_file(str(path))
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert not any(k.startswith(("unet.", "base_model.")) or ".default." in k for k in sd)
    assert any("to_out_mv.0.lora_B.weight" in k for k in sd) and any(k.endswith("attn2.to_k.lora_A.weight") for k in sd)
    # 1) the mvz loader (what `mvz generate --lora` uses)
    m = load_model("tiny", device="cpu", dtype="fp32", lora=str(path))
    got = get_peft_model_state_dict(m.unet)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    # 2) peft directly, the upstream way: add the adapter with the training LoraConfig, then set the state dict
    m2 = copy.deepcopy(tiny_model)
    cfg = tr.cfg.training
    assert lora_config(cfg.lora_rank, cfg.lora_alpha).target_modules == set(m.unet.peft_config["default"].target_modules)
    add_lora(m2.unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    res = set_peft_model_state_dict(m2.unet, sd)
    assert not [k for k in res.unexpected_keys if "lora" in k]
    got2 = get_peft_model_state_dict(m2.unet)
    assert all(torch.equal(got2[k], sd[k]) for k in sd)
    # the trained LoRA changes the output
    from mvz.pipeline import MultiviewPipeline

    with torch.no_grad():
        a = MultiviewPipeline(tiny_model).sample(["cat"], [1], steps=2).images
        b = MultiviewPipeline(m).sample(["cat"], [1], steps=2).images
    assert not torch.equal(a, b)
