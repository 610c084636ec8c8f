"""`mvz train` end to end on the tiny preset, and its bad-input errors (one line, exit 2)."""

from __future__ import annotations

import json

import pytest
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        main(["train", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_tiny_preset_end_to_end_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(["--preset", "tiny", "--run-dir", str(run), "--device", "cpu",
                              "--set", "training.num_epochs=1", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["checkpoint"].endswith("epoch_0")
    for rel in ("config.yaml", "run.json", "metrics.jsonl", "samples/epoch_0.png",
                "epoch_0/mvczigal_lcm_sdxl_lora.safetensors", "epoch_0/optimizer.bin", "epoch_0/random_states_0.pkl",
                "epoch_0/custom_checkpoint_0.pkl", "epoch_0/state.json"):
        assert (run / rel).is_file(), rel
    assert any((run / "tensorboard").iterdir())
    from PIL import Image

    sample = Image.open(run / "samples" / "epoch_0.png")
    assert sample.text["rows"] == "standard, ZMV per prompt"
    labels = sample.convert("L").crop((0, 0, 72, sample.height))  # the label column left of the views
    assert sample.width == 72 + 6 * 64 and min(labels.getdata()) < 128, "each row is labelled"
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "approx_kl", "clipfrac", "lambda", "tau", "reward/standard/view_mean", "reward/zmv/joint_mean",
                "reward/zmv/joint/geometry_mean"):
        assert key in rec, key

    # a finished run continues when its epoch budget grows
    code, out, err = run_cli(["--resume", str(run), "--set", "training.num_epochs=2", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (run / "epoch_1" / "mvczigal_lcm_sdxl_lora.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # a training state cut by a kill (or a full disk) names the folder to delete to resume from the one before
    state = run / "epoch_1" / "custom_checkpoint_0.pkl"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    code, _, err = run_cli(["--resume", str(run), "--set", "training.num_epochs=3", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, f"training state in {run / 'epoch_1'} is truncated or unreadable",
                          f"Delete the folder {run / 'epoch_1'} to resume from epoch_0")
    state.write_bytes(good)

    # resuming with another config is refused
    code, _, err = run_cli(["--resume", str(run), "--set", "training.lora_rank=8"], capsys)
    assert_one_line_error(code, err, "training.lora_rank")
    code, _, err = run_cli(["--resume", str(run), "--preset", "lcm_sdxl_simple"], capsys)
    assert_one_line_error(code, err, "cannot resume")
    # a hand edit of a non-resumable key in RUN/config.yaml is caught against run.json's record
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved.replace("lora_rank: 4", "lora_rank: 8"))
    code, _, err = run_cli(["--resume", str(run), "--set", "training.num_epochs=3", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "config.yaml was edited (training.lora_rank is 8 there", "trained with 4")
    (run / "config.yaml").write_text(saved)
    # a new run into an existing folder is refused
    code, _, err = run_cli(["--preset", "tiny", "--run-dir", str(run), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "already exists")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "tiny", "--set", "training.nope=1"], "unknown config key training.nope"),
        (["--preset", "tiny", "--set", "training.lr=fast"], "training.lr"),
        (["--preset", "tiny", "--set", "training.num_epochs=two"], "training.num_epochs"),
        (["--preset", "nope"], "unknown training preset"),
        (["--preset", "tiny", "--set", "training.seed=-5"], "config key training.seed: input should be greater than"),
        (["--preset", "tiny", "--set", "training.seed=5000000000"], "training.seed: input should be less than"),
        (["--preset", "tiny", "--set", "training.gradient_accumulation_steps=3"],
         "training.gradient_accumulation_steps 3 does not divide the 8 micro-steps of an iteration"),
        (["--preset", "tiny", "--set", "training.lr=nan"], "training.lr: input should be a finite number"),
        (["--preset", "tiny", "--log-with", "mlflow"], "--log-with 'mlflow' is not known"),
        ([], "no training config"),
    ],
)
def test_cli_bad_config(tmp_path, capsys, args, needle):
    code, _, err = run_cli([*args, "--run-dir", str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r").exists()


def test_cli_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  lr: 1e-4\n  bogus: 3\n")
    code, _, err = run_cli(["--config", str(cfg), "--run-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "training.bogus")


def test_cli_binary_config_file(tmp_path, capsys):
    cfg = tmp_path / "weights.bin"
    cfg.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(["--config", str(cfg), "--run-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, f"config file {cfg} is")
    assert not (tmp_path / "r").exists()


def test_cli_early_failure_leaves_no_run_files(tmp_path, capsys, monkeypatch):
    import mvz.train.trainer as trainer_mod

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_mod.Trainer, "_load_model", broken)  # after run.json/config.yaml are written
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(["--preset", "tiny", "--set", "reward.reward_fn=brightness", "--set", "reward.mv_reward_fn=brightness",
                 "--run-dir", str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert not (tmp_path / "r").exists()


def test_cli_prompt_files(tmp_path, capsys):
    code, _, err = run_cli(["--preset", "tiny", "--prompts", str(tmp_path / "missing.txt"), "--device", "cpu",
                            "--run-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    code, _, err = run_cli(["--preset", "tiny", "--prompts", str(empty), "--device", "cpu",
                            "--run-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "has no prompts")
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(["--preset", "lcm_sdxl_mate3d", "--device", "cpu", "--run-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "MATE_3D.txt")


def test_cli_resume_from_non_run(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(["--resume", str(tmp_path / "plain")], capsys)
    assert_one_line_error(code, err, "not an mvz training run")
    code, _, err = run_cli(["--resume", str(tmp_path / "absent")], capsys)
    assert_one_line_error(code, err, "not an mvz training run")


def test_cli_missing_reward_checkpoint_fails_before_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MVZ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["--preset", "tiny", "--set", "reward.preset=null", "--device", "cpu",
                            "--run-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "pickscore")
    assert not (tmp_path / "r").exists()  # nothing sampled, no run folder
    assert not (tmp_path / "home" / "models").exists()  # the model was not even loaded


def test_cli_print_config(capsys):
    code, out, err = run_cli(["--preset", "lcm_sdxl_simple", "--set", "training.lr=5e-5", "--print-config"], capsys)
    assert code == 0, err
    import yaml

    data = yaml.safe_load(out)
    assert data["training"]["lr"] == 5e-5 and data["training"]["gradient_accumulation_steps"] == 32
