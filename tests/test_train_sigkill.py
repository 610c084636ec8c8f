"""A run SIGKILLed in epoch 1 (no ``finally``, no atexit) resumes through ``accelerator.load_state`` and ends
bit-exactly where the uninterrupted run ends. One subprocess start (torch + diffusers imports): ``slow``."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.train.config import load_config
from mvz.train.trainer import Trainer

pytestmark = pytest.mark.slow
OVER = ["reward.reward_fn=brightness", "reward.mv_reward_fn=brightness", "reward.preset=null",
        "logging.tensorboard=false", "logging.sample_grid=false", "training.num_inference_steps=2",
        "training.sample_batch_size_per_gpu=3", "training.gradient_accumulation_steps=3", "training.lr=1e-2"]
KILLER = """
import os, signal, sys, torch
from mvz.train.config import load_config
from mvz.train.trainer import Trainer
torch.set_num_threads(1)

def kill(info):
    if info["epoch"] == 1 and info["micro"] == 4:  # after epoch 1's first optimiser step
        os.kill(os.getpid(), signal.SIGKILL)

Trainer(load_config("tiny", overrides=sys.argv[2:]), sys.argv[1], device="cpu", echo=lambda m: None,
        hooks={"micro_step": kill}).train()
"""


def test_resume_after_sigkill_is_bit_exact(tmp_path, tiny_model):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(tmp_path / "cut"), *OVER], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (tmp_path / "cut" / "epoch_0").is_dir() and not (tmp_path / "cut" / "epoch_1").exists()
    cfg = load_config("tiny", overrides=OVER)
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, device="cpu", model=copy.deepcopy(tiny_model),
                      echo=lambda m: None).setup()
    assert resumed.start_epoch == 1 and resumed.global_step == 2
    assert resumed.accelerator.step == 6  # accelerate's micro-step counter, restored by load_state
    resumed.train()
    full = Trainer(cfg, tmp_path / "full", device="cpu", model=copy.deepcopy(tiny_model), echo=lambda m: None)
    full.train()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "epoch_1" / "mvczigal_lcm_sdxl_lora.safetensors"))
    b = load_file(str(tmp_path / "cut" / "epoch_1" / "mvczigal_lcm_sdxl_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    oa = torch.load(tmp_path / "full" / "epoch_1" / "optimizer.bin", weights_only=False)
    ob = torch.load(tmp_path / "cut" / "epoch_1" / "optimizer.bin", weights_only=False)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    assert [m["loss"] for m in full.run.read_metrics()] == [m["loss"] for m in resumed.run.read_metrics()]
