"""A LoRA trained with lora_alpha != rank is saved so upstream's LoraConfig(r, lora_alpha=r) applies it right."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.models.cameras import CameraSet
from mvz.models.lora import LORA_FILENAME, add_lora, load_lora, lora_state_dict, save_lora
from mvz.pipeline import MultiviewPipeline, TorchDenoiser

UPSTREAM_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "to_k_mv", "to_q_mv", "to_v_mv", "to_out_mv.0"]
RANK = 4


def eps(model) -> torch.Tensor:
    cond = MultiviewPipeline(model).prepare(["a teapot"], CameraSet(), 64, 64)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return TorchDenoiser(model, 6)(x, torch.tensor([759.0]), *cond.args())


def test_alpha_twice_rank_loads_the_same_through_upstream_peft_and_mvz(tmp_path, tiny_model):
    trained = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    add_lora(trained.unet, rank=RANK, alpha=2 * RANK, init="gaussian")
    for name, p in trained.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    b_trained = {k: v.clone() for k, v in lora_state_dict(trained.unet).items() if "lora_B" in k}
    reference = eps(trained)
    path = save_lora(trained.unet, tmp_path / LORA_FILENAME)

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["lora_alpha"] == str(RANK) and meta["lora_rank"] == str(RANK)
    stored = load_file(str(path))
    for k, b in b_trained.items():  # alpha/r = 2 folded into B
        torch.testing.assert_close(stored[k], 2.0 * b, rtol=0, atol=0)

    upstream = copy.deepcopy(tiny_model)  # MVC-ZigAL's inference: the training config with alpha = r
    upstream.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=UPSTREAM_TARGETS))
    result = set_peft_model_state_dict(upstream.unet, load_file(str(path)))
    assert not [k for k in (result.unexpected_keys or []) if "lora" in k]
    ours = copy.deepcopy(tiny_model)
    load_lora(ours.unet, path)

    base = eps(tiny_model)
    assert (reference - base).abs().max() > 1e-3  # the LoRA matters at this size
    torch.testing.assert_close(eps(upstream), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eps(ours), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # three tiny training runs: ~25 s of CPU
def test_resume_of_an_alpha_run_is_exact(tmp_path, tiny_model):
    from mvz.train.config import load_config
    from mvz.train.trainer import UNFOLDED_B_FILE, Trainer

    over = ["reward.reward_fn=brightness", "reward.mv_reward_fn=brightness", "reward.preset=null",
            "logging.tensorboard=false", "logging.sample_grid=false", "training.num_inference_steps=2",
            "training.gradient_accumulation_steps=3", "training.sample_batch_size_per_gpu=3", "training.lora_alpha=6",
            "training.lr=1e-2"]

    def trainer(name, epochs, resume=False):
        cfg = load_config("tiny", overrides=[*over, f"training.num_epochs={epochs}"])
        return Trainer(cfg, tmp_path / name, resume=resume, device="cpu", model=copy.deepcopy(tiny_model),
                       echo=lambda m: None)

    full = trainer("full", 2)
    full.train()
    trainer("cut", 1).train()
    # a checkpoint without the exact trained B (only the folded file): unfolded from the file's B·alpha/r
    shutil.copytree(tmp_path / "cut", tmp_path / "file_only")
    (tmp_path / "file_only" / "epoch_0" / UNFOLDED_B_FILE).unlink()
    for name in ("cut", "file_only"):
        resumed = trainer(name, 2, resume=True).setup()
        assert resumed.start_epoch == 1
        resumed.train()
    a = load_file(str(tmp_path / "full" / "epoch_1" / LORA_FILENAME))
    b = load_file(str(tmp_path / "cut" / "epoch_1" / LORA_FILENAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(tmp_path / "file_only" / "epoch_1" / LORA_FILENAME))
    for k in a:  # B·1.5/1.5 rounds, and Adam amplifies a last-bit difference near zero: close, not bit-exact
        assert (c[k] - a[k]).norm() <= 1e-3 * a[k].norm() + 1e-7, k
    trained_b = {k: v for k, v in lora_state_dict(full.model.unet).items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in trained_b.values())
    for k, v in trained_b.items():  # the file holds B·(6/4); the run's own LoRA keeps alpha 6
        torch.testing.assert_close(a[k], v.float() * 1.5, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [RANK, None])
def test_alpha_equal_rank_is_saved_unchanged(tmp_path, tiny_model, alpha):
    model = copy.deepcopy(tiny_model)
    add_lora(model.unet, rank=RANK, alpha=alpha, init="gaussian")
    for name, p in model.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    sd = lora_state_dict(model.unet)
    stored = load_file(str(save_lora(model.unet, tmp_path / LORA_FILENAME)))
    assert all(torch.equal(stored[k], v) for k, v in sd.items())
