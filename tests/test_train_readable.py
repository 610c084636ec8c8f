"""A run you can read: trackers write what they say, a custom reward from a file trains and scores, and
``mvz train report`` draws every plot with the numbers of ``metrics.jsonl``.

One tiny 2-epoch run (module fixture) with a custom per-view reward from a file and TensorBoard on.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import textwrap

import pytest
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.cli import main
from mvz.train.config import load_config
from mvz.train.trainer import Trainer

REWARD_FILE = """
import torch

def bright(images, prompts):
    # mean pixel per view, offset so its numbers are told apart from any built-in reward
    assert images.ndim == 5 and len(prompts) == images.shape[0]
    return images.mean(dim=(2, 3, 4)) + 100.0

def joint(images, prompts):
    return images.mean(dim=(1, 2, 3, 4)) * 0 + 7.0

def two_args_missing(images):
    return images.mean(dim=(2, 3, 4))

def wrong_shape(images, prompts):
    return images.mean(dim=(1, 2, 3, 4))[:, None, None]

def nan_scores(images, prompts):
    return images.mean(dim=(2, 3, 4)) * float("nan")
"""
OVER = ["reward.preset=null", "training.num_inference_steps=2", "training.gradient_accumulation_steps=4", "training.num_epochs=2", "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARD_FILE))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, reward_file):
    cfg = load_config("tiny", overrides=[*OVER, f"reward.reward_fn={reward_file}:bright",
                                         f"reward.mv_reward_fn={reward_file}:joint"])
    tr = Trainer(cfg, tmp_path_factory.mktemp("readable") / "run", device="cpu", model=copy.deepcopy(tiny_model),
                 echo=lambda m: None)
    tr.train()
    return tr


def test_custom_reward_from_a_file_trains_and_is_logged(run):
    metrics = run.run.read_metrics()
    assert len(metrics) == 2 and all(m["optimizer_steps"] == 1 for m in metrics)
    for m in metrics:  # brightness in [0, 1] + 100, and the constant joint reward
        assert 100.0 <= m["reward/standard/view_mean"] <= 101.0 and 100.0 <= m["reward/zmv/view_mean"] <= 101.0
        assert m["reward/standard/joint_mean"] == 7.0
    assert (run.run.path / "epoch_1" / "mvczigal_lcm_sdxl_lora.safetensors").is_file()


def test_tensorboard_events_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.run.path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    metrics = run.run.read_metrics()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [0, 1]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("lambda")] == pytest.approx([m["lambda"] for m in metrics], abs=1e-9)
    images = acc.Images("samples/standard_vs_zmv")
    assert [e.step for e in images] == [0, 1]
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert img.size == Image.open(run.run.sample_file(1)).size  # the labelled grid, both rows


def test_log_with_none_writes_no_tracker_files(tmp_path, tiny_model):
    cfg = load_config("tiny", overrides=["reward.reward_fn=brightness", "reward.mv_reward_fn=brightness",
                                         "reward.preset=null", "logging.tensorboard=false"])
    tr = Trainer(cfg, tmp_path / "run", device="cpu", model=copy.deepcopy(tiny_model), echo=lambda m: None).setup()
    assert tr.accelerator.trackers == []
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_log_with_wandb_offline(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed here (pip install wandb to run this test)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("tiny", overrides=["reward.reward_fn=brightness", "reward.mv_reward_fn=brightness",
                                         "reward.preset=null", "logging.tensorboard=false", "logging.wandb=true",
                                         "training.num_epochs=1", "training.num_inference_steps=2",
                                         "training.gradient_accumulation_steps=4"])
    Trainer(cfg, tmp_path / "run", device="cpu", model=copy.deepcopy(tiny_model), echo=lambda m: None).train()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_custom_reward_in_mvz_score(run, reward_file, capsys):
    grid = run.run.sample_file(1)
    from PIL import Image

    strip = Image.open(grid).convert("RGB")
    strip = strip.crop((72, 0, strip.width, 64))  # the first row's six views
    path = grid.parent / "views.png"
    strip.save(path)
    main(["score", str(path), "--prompt", "cat", "--rewards", f"{reward_file}:bright", "--json"])
    out = json.loads(capsys.readouterr().out)
    entry = out["scores"][f"{reward_file}:bright"]
    import numpy as np

    views = np.asarray(strip, dtype=np.float32).reshape(64, 6, 64, 3) / 255.0
    assert entry["kind"] == "per_view"
    assert entry["per_view"] == pytest.approx((views.mean(axis=(0, 2, 3)) + 100.0).tolist(), abs=1e-5)


@pytest.mark.parametrize("fn, needle", [
    ("two_args_missing", "wrong signature"),
    ("wrong_shape", "returned shape (2, 1, 1) for 2 sets of 6 views"),
    ("nan_scores", "returned NaN/inf"),
    ("absent", "has no callable 'absent'"),
])
def test_bad_custom_reward_fails_before_sampling(tmp_path, capsys, reward_file, fn, needle):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "tiny", "--device", "cpu", "--run-dir", str(tmp_path / "r"),
              "--reward", f"{reward_file}:{fn}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "r").exists()  # nothing sampled, no run folder


def _report_numbers_equal_metrics(report_dir, metrics):
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["iterations"] == len(metrics)
    for key, values in summary["series"].items():
        name = f"{key}_mean" if key.startswith("reward/") else key
        want = [m[name] for m in metrics]
        assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(values, want, strict=True)), key
    return summary


def test_report_writes_every_plot_with_the_metrics_numbers(run):
    from PIL import Image

    from mvz.train.report import EPOCH_PLOT, PLOTS

    main(["train", "report", str(run.run.path)])
    out = run.run.path / "report"
    for name in [*PLOTS, EPOCH_PLOT]:
        img = Image.open(out / name)
        assert img.format == "PNG" and img.width > 300 and len(set(img.convert("L").getdata())) > 8, name
    metrics = run.run.read_metrics()
    summary = _report_numbers_equal_metrics(out, metrics)
    assert set(summary["plots"]) == {*PLOTS, EPOCH_PLOT}
    assert {"reward/standard/view", "reward/zmv/joint", "tau", "lambda", "clipfrac", "zmv_advantage/joint",
            "kl_to_base", "approx_kl"} <= set(summary["series"])
    assert summary["epoch_seconds"] == {str(e): sum(m["time/iteration_s"] for m in metrics if m["epoch"] == e)
                                        for e in (0, 1)}
    page = (out / "report.md").read_text()
    assert "finished" in page and "![samples](last_samples.png)" in page
    for m in metrics:  # the per-epoch table shows the logged numbers
        assert f"| {m['epoch']} | {m['reward/view_mean']:.6g} | {m['reward/joint_mean']:.6g} | {m['tau']:.6g} |" in page
    assert (out / "last_samples.png").read_bytes() == run.run.sample_file(1).read_bytes()


def test_report_on_a_killed_run(run, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(run.run.path, killed, ignore=shutil.ignore_patterns("report", "epoch_1"))
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # a line cut by the kill
    (killed / "samples" / "epoch_1.png").unlink()
    main(["train", "report", str(killed)])
    page = (killed / "report" / "report.md").read_text()
    assert "stopped: the last checkpoint is epoch_0" in page and "1 iterations logged" in page
    _report_numbers_equal_metrics(killed / "report", [json.loads(lines[0])])


def test_report_of_a_non_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "not an mvz training run" in err[0]



def test_the_documented_reward_example_passes_the_probe(tmp_path):
    import re
    from pathlib import Path

    from mvz.rewards.custom import load_custom_reward

    doc = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    code = re.search(r"```python\n(# my_rewards.py.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    (tmp_path / "my_rewards.py").write_text(code)
    reward = load_custom_reward(f"{tmp_path / 'my_rewards.py'}:sharpness", views=6, size=32)
    assert reward.kind == "per_view"
    out = reward.score(__import__("torch").rand(3, 6, 3, 32, 32), ["a"] * 3)
    assert out.per_view.shape == (3, 6) and (out.per_view > 0).all()
