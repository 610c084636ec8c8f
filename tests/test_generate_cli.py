import json
import subprocess
import sys

import pytest
from PIL import Image

from mvz.cli import main


def run_cli(args, capsys=None):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def test_generate_tiny_end_to_end(tmp_path, tiny_model, capsys):
    out = tmp_path / "out.png"
    prompt = "a DSLR photo of a frog wearing a sweater" + ", highly detailed" * 30  # past the 77-token window
    main(["generate", prompt, "--model", "tiny", "--seed", "42", "--steps", "4",
          "--out", str(out), "--save-views", "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("the text encoders see the first 77") == 1, err  # noted once, as mvz score does
    grid = Image.open(out)
    assert grid.size == (6 * 64, 64)
    # metadata as A1111 and ComfyUI read it (nothing under ComfyUI's JSON keys); views carry it too
    meta = json.loads(grid.text["mvz"])
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["model"]) == (prompt, 42, 4, "tiny")
    assert "prompt" not in grid.text and "workflow" not in grid.text
    assert grid.text["parameters"].startswith(prompt + "\nSteps: 4, Sampler: LCM") and "Seed: 42" in grid.text["parameters"]
    assert json.loads(Image.open(tmp_path / "out_view0_az0.png").text["mvz"])["prompt"] == prompt
    # the cameras for 3D tools, as conditioned
    cams = json.loads((tmp_path / "out_cameras.json").read_text())
    assert [f["file_path"] for f in cams["frames"]][:2] == ["out_view0_az0.png", "out_view1_az45.png"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    views = sorted(tmp_path.glob("out_view*_az*.png"))
    assert len(views) == 6
    side = json.loads((tmp_path / "out.json").read_text())
    assert side["prompt"].startswith("a DSLR") and side["seed"] == 42 and side["steps"] == 4
    assert side["backend"]["name"] == "torch" and side["model"] == "tiny" and "denoise_s" in side["timings"]
    assert [v["azimuth"] for v in side["views"]] == [0, 45, 90, 180, 270, 315]
    # view 2 of the grid is the per-view PNG
    assert Image.open(tmp_path / "out_view2_az90.png").tobytes() == grid.crop((128, 0, 192, 64)).tobytes()


def test_generate_prompt_file_and_json(tmp_path, capsys, tiny_model):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\n# comment\na dog\n")
    main(["generate", "--prompts", str(pf), "--model", "tiny", "--steps", "2", "--out-dir", str(tmp_path / "grids"),
          "--batch-size", "2", "--views", "4", "--zmv", "--json"])
    files = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert files == ["000_a-cat.png", "001_a-dog.png"]
    data = json.loads(capsys.readouterr().out)
    assert [d["prompt"] for d in data] == ["a cat", "a dog"] and data[1]["seed"] == 43 and data[0]["nfe"] == 4


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "", "--model", "tiny"], "prompt is empty"),
        (["generate", "x", "--model", "tiny", "--steps", "0"], "--steps"),
        (["generate", "x", "--model", "tiny", "--views", "0"], "--views"),
        (["generate", "x", "--model", "tiny", "--resolution", "70"], "multiple of 8"),
        (["generate", "x", "--model", "tiny", "--resolution", "72"], "which this model needs"),
        (["generate", "x", "--model", "/nonexistent/model"], "not a preset"),
        (["generate", "x", "--model", "tiny", "--lora", "/nonexistent.safetensors"], "does not exist"),
        (["generate", "x", "--model", "tiny", "--adapter", "/nonexistent.safetensors"], "neither a local path"),
        (["generate", "--model", "tiny"], "no prompt"),
        (["generate", "x", "--model", "tiny", "--backend", "magic"], "unknown backend"),
    ],
)
def test_generate_bad_inputs_exit_2_without_output(tmp_path, capsys, args, needle, tiny_model):
    out = tmp_path / "new" / "o.png"  # an early error must not leave an empty "new" folder either
    code = run_cli([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_empty_prompt_file(tmp_path, capsys):
    pf = tmp_path / "p.txt"
    pf.write_text("\n# nothing\n")
    assert run_cli(["generate", "--prompts", str(pf), "--model", "tiny", "--out-dir", str(tmp_path)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_cuda_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert run_cli(["generate", "x", "--model", "tiny", "--device", "cuda", "--out", str(tmp_path / "o.png")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--version"], ["generate", "--help"], ["export", "-h"],
                                  ["train", "--help"], ["bench", "--help"], ["score", "--help"]])
def test_help_does_not_import_torch(argv):
    """Runs the help in a fresh interpreter and reads sys.modules afterwards: torch must not be there."""
    code = (f"import sys\nfrom mvz.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
            f"    assert not e.code, e.code\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", f"mvz {' '.join(argv)} imported torch"


def test_info_json(capsys):
    main(["info", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["torch"] and data["devices"][0]["type"] == "cpu"


def test_usage_error_exits_2(capsys):
    assert run_cli(["generate", "--bogus-option"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_unwritable_output_fails_before_loading(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_cli(["generate", "x", "--model", "tiny", "--out", str(blocker / "o.png")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert run_cli(["export", "--model", "tiny", "--onnx-only", "--out", str(blocker / "sub" / "exp")]) == 2
    assert "not writable" in capsys.readouterr().err
