"""The prepared GPU script's CPU-runnable parts: the whole flow on the tiny model, and the GPU guard."""

from __future__ import annotations

import json

import pytest


def test_gpu_check_runs_on_tiny_cpu(tmp_path):
    from bench.gpu_check import main

    out = tmp_path / "gpu"
    code = main(["--model", "tiny", "--device", "cpu", "--height", "64", "--steps", "2", "--runs", "1", "--warmup", "0",
                 "--backends", "torch,tensorrt", "--train-steps", "1", "--threads", "1", "--no-fidelity", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["backends"]["torch"]["unet_step_ms"] > 0
    assert "tensorrt" in summary["skipped"]
    tr = summary["train_microstep"]
    assert tr["loss_finite"] and tr["median_s"] > 0 and tr["trainable_params"] > 0
    assert (out / "report.json").is_file()


def test_gpu_check_without_cuda_says_so(capsys):
    import torch

    from bench.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["--out", "unused"]) == 3
    assert "no CUDA GPU" in capsys.readouterr().err
