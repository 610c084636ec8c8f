"""bench/gpu_check.py starts on a bare GPU box: a clean venv holding only the box's package set (CPU torch in
place of CUDA torch) plus the wheels of bench/gpu_wheels.txt, installed the way bench/README.md says, runs
the check on the tiny model to the end. Slow (it installs packages from the package index)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the GPU box holds that mvz's import path needs (the box's image; pillow and requests are there too,
# .library/device/KINDS.md); torch is the CPU build of the same release here
BOX_SET = ["torch==2.13.0", "transformers", "peft", "accelerate", "onnx", "onnxruntime", "safetensors", "typer",
           "pytest", "pillow", "requests"]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_gpu_check_runs_in_a_clean_venv_with_only_the_carried_wheels(tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0  # no system site-packages
    py = str(venv / "bin" / "python")
    got = _run([py, "-m", "pip", "install", "-q", *BOX_SET])
    if got.returncode != 0:
        pytest.skip(f"could not install the box's package set here: {got.stderr.strip().splitlines()[-1:]}")
    wheels, site = tmp_path / "whl", tmp_path / "site"
    prep = _run(["bash", str(REPO / "bench" / "prepare_gpu_wheels.sh"), str(wheels)])
    if prep.returncode != 0:
        pytest.skip(f"could not download the wheels here: {prep.stderr.strip().splitlines()[-1:]}")
    assert all(w.name.endswith("-none-any.whl") for w in wheels.glob("*.whl"))
    install = _run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, sorted(wheels.glob("*.whl")))])
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{site}", MVZ_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    where = _run([py, "-c", "import diffusers, polygraphy, torch; print(diffusers.__file__, torch.__file__)"],
                 env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split()[0].startswith(str(site)) and where.stdout.split()[1].startswith(str(venv))
    out = tmp_path / "gpu"
    # torch-compile is left out here only for time (inductor on 1 CPU thread takes ~9 minutes for the tiny model)
    run = _run([py, "-m", "bench.gpu_check", "--device", "cpu", "--model", "tiny", "--height", "64", "--steps", "2",
                "--runs", "1", "--warmup", "0", "--train-steps", "1", "--threads", "1", "--out", str(out),
                "--backends", "torch,torch-cudagraph,onnxruntime,tensorrt"], env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failures"] == {}, summary["failures"]
    assert set(summary["backends"]) == {"torch", "onnxruntime"}
    assert summary["train_microstep"]["loss_finite"] and summary["train_microstep"]["grad_checkpointing"]
    assert "| torch |" in (out / "gpu_check.md").read_text()
