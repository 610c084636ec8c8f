"""``mvz score`` end to end on the tiny reward checkpoints (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture()
def home(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "score_cli_home"
    monkeypatch.setenv("MVZ_HOME", str(path))
    return path


def run(args, capsys):
    """``mvz score ...`` through ``mvz.cli.main``; returns (exit code, stdout, stderr)."""
    from mvz import cli

    argv = list(args)
    if len(cli.app.registered_commands) == 1:  # a one-command Typer app takes no command name
        argv = argv[1:]
    code = 0
    try:
        cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _grid(path, views=6, size=32, mode="RGB", width=None):
    rng = np.random.default_rng(0)
    w = width or views * size
    shape = (size, w, 3) if mode == "RGB" else (size, w)
    Image.fromarray((rng.random(shape) * 255).astype("uint8"), mode=None).convert(mode).save(path)
    return path


def test_score_grid_json(home, tmp_path, capsys):
    grid = _grid(tmp_path / "grid.png")
    code, out, err = run(["score", str(grid), "--prompt", "a red chair", "--rewards", "pickscore", "--rewards",
                          "hyperscore", "--rewards", "hpsv2,imagereward", "--reward-preset", "tiny", "--json"],
                         capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["views"] == 6 and set(data["scores"]) == {"pickscore", "hyperscore", "hpsv2", "imagereward"}
    assert len(data["scores"]["pickscore"]["per_view"]) == 6
    assert set(data["scores"]["hyperscore"]["sub_scores"]) == {"alignment", "geometry", "texture", "overall"}
    assert data["scores"]["hyperscore"]["per_set"] == data["scores"]["hyperscore"]["sub_scores"]["overall"]


def test_score_folder_table_and_truncation_note(home, tmp_path, capsys):
    folder = tmp_path / "views"
    folder.mkdir()
    for i in range(4):
        _grid(folder / f"view_{i}.png", views=1)
    code, out, err = run(["score", str(folder), "-p", " ".join(["chair"] * 100), "--rewards", "hpsv2", "--reward-preset", "tiny"],
                         capsys)
    assert code == 0, err
    assert "hpsv2" in out and "4 views" in out
    assert err.count("truncated") == 1


@pytest.mark.parametrize("case,needle", [
    ("width", "not divisible into 6 views"),
    ("gray", "rewards need RGB"),
    ("missing", "does not exist"),
    ("nockpt", "HPS_v2_compressed.pt not found"),
])
def test_score_bad_input_exits_2(home, tmp_path, capsys, monkeypatch, case, needle):
    args = ["score"]
    if case == "width":
        args.append(str(_grid(tmp_path / "g.png", width=190)))
    elif case == "gray":
        args.append(str(_grid(tmp_path / "g.png", mode="L")))
    elif case == "missing":
        args.append(str(tmp_path / "nope.png"))
    else:
        monkeypatch.setenv("MVZ_HOME", str(tmp_path / "empty"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        args.append(str(_grid(tmp_path / "g.png")))
    args += ["-p", "a chair", "--rewards", "hpsv2"] + ([] if case == "nockpt" else ["--reward-preset", "tiny"])
    code, out, err = run(args, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
