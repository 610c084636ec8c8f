"""How the command line behaves, case by case: exit code, the one line it prints, and what it leaves behind.

Read the tables top to bottom; each row is one thing a user can do wrong (or interrupt) and what mvz answers.

* ``EARLY``: refused before anything loads. All rows run in ONE fresh interpreter (cheap), each in its own
  empty folder, and that interpreter must never import torch: a bad flag costs milliseconds.
* ``SIGNALS``: a real SIGINT/SIGTERM sent to a child ``mvz generate`` once it says it is sampling.
* ``READ_ONLY``: folders the user may not write (as root, the child runs without CAP_DAC_OVERRIDE, so the
  permission bits apply to it as to any other user).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAN_HINT = "must be a finite number"


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    code: int
    message: str  # must appear in the last stderr line (or stdout for exit 0)
    setup: dict[str, str] = field(default_factory=dict)  # files/folders made first: name -> text ("/" = folder)
    note: str | None = None  # a "note:" line that must come first (old spellings)


G = ["generate", "a chair", "--model", "tiny"]
EARLY = [
    # ---- numbers (generate) -----------------------------------------------------------------------------------
    Case("guidance-nan", [*G, "--guidance", "nan", "--out", "o.png"], 2, "--guidance must be a finite number, got nan"),
    Case("guidance-inf", [*G, "--guidance", "inf", "--out", "o.png"], 2, "--guidance must be a finite number"),
    Case("lora-scale-nan", [*G, "--lora-scale", "nan"], 2, "--lora-scale must be a finite number"),
    Case("azimuth-nan", [*G, "--azimuths", "0,nan,180"], 2, "--azimuths must be a finite number"),
    Case("azimuth-text", [*G, "--azimuths", "0,left"], 2, "--azimuths must be comma-separated numbers"),
    Case("elevation-range", [*G, "--elevation", "120"], 2, "--elevation must be in [-90, 90], got 120"),
    Case("elevation-inf", [*G, "--elevation", "-inf"], 2, "--elevation must be a finite number"),
    Case("seed-negative", [*G, "--seed", "-1"], 2, "--seed must be 0 or more, got -1. Seeds are 0..2^63-1"),
    Case("seed-too-big", [*G, "--seed", str(2**63)], 2, "is above 2^63-1"),
    Case("resolution-huge", [*G, "--resolution", "1000000"], 2, "need at least"),
    Case("resolution-odd", [*G, "--resolution", "100"], 2, "--resolution must be a positive multiple of 8"),
    Case("steps-0", [*G, "--steps", "0"], 2, "--steps must be between 1 and 50"),
    Case("steps-51", [*G, "--steps", "51"], 2, "--steps must be between 1 and 50"),
    Case("views-0", [*G, "--views", "0"], 2, "--views must be at least 1, got 0"),
    Case("views-huge", [*G, "--views", "100000", "--resolution", "768"], 2, "need at least"),
    Case("batch-size-0", [*G, "--batch-size", "0"], 2, "--batch-size must be at least 1"),
    # ---- output policy (generate) -----------------------------------------------------------------------------
    Case("out-is-folder", [*G, "--out", "d"], 2, "--out d is a folder. Name a .png file", {"d": "/"}),
    Case("out-exists", [*G, "--out", "o.png"], 2, "o.png already exists. Pass --overwrite", {"o.png": "old"}),
    Case("batch-exists", ["generate", "--prompts", "p.txt", "--model", "tiny", "--out-dir", "g"], 2,
         "1 of 2 grids exist (first g/000_a-cat.png)", {"p.txt": "a cat\na dog\n", "g": "/", "g/000_a-cat.png": "x"}),
    Case("overwrite-and-skip", [*G, "--overwrite", "--skip-existing"], 2, "contradict each other"),
    Case("prompts-without-out-dir", ["generate", "--prompts", "p.txt", "--model", "tiny"], 2, "needs --out-dir",
         {"p.txt": "a cat\n"}),
    Case("prompt-file-bom-only", ["generate", "--prompts", "p.txt", "--out-dir", "g"], 2, "has no prompts",
         {"p.txt": "\ufeff\n# nothing\n"}),
    Case("out-dir-missing-parent-is-file", [*G, "--out", "f/sub/o.png"], 2, "is not writable", {"f": "x"}),
    # ---- bench / export / score numbers -----------------------------------------------------------------------
    Case("bench-views-0", ["bench", "--model", "tiny", "--views", "0"], 2, "--views must be at least 1, got 0"),
    Case("bench-resolution-huge", ["bench", "--model", "tiny", "--resolution", "1000000"], 2, "need at least"),
    Case("bench-guidance-nan", ["bench", "--model", "tiny", "--guidance", "nan"], 2, NAN_HINT),
    Case("bench-seed-negative", ["bench", "--model", "tiny", "--seed", "-5"], 2, "--seed must be 0 or more"),
    Case("bench-runs-0", ["bench", "--model", "tiny", "--runs", "0"], 2, "--runs must be at least 1"),
    Case("bench-resolution-and-height", ["bench", "--resolution", "512", "--height", "512"], 2, "Pass only --resolution"),
    Case("bench-old-spelling", ["bench", "--engines-dir", "e", "--batch", "0"], 2, "--batch-size must be at least 1",
         note="--engines-dir is now --engines"),
    Case("export-lora-scale-nan", ["export", "--model", "tiny", "--out", "x", "--lora-scale", "nan"], 2, NAN_HINT),
    Case("export-views-0", ["export", "--model", "tiny", "--out", "x", "--views", "0"], 2, "--views must be at least 1"),
    Case("export-resolution-huge", ["export", "--out", "x", "--resolution", "1000000"], 2, "need at least"),
    Case("export-out-is-file", ["export", "--model", "tiny", "--out", "x"], 2, "--out x is a file", {"x": "data"}),
    Case("export-old-batch", ["export", "--out", "x", "--batch", "0"], 2, "--batch-size must be at least 1",
         note="--batch is now --batch-size"),
    Case("score-views-0", ["score", "g.png", "-p", "a chair", "--views", "0"], 2, "--views must be at least 1"),
    Case("score-missing", ["score", "nope.png", "-p", "a chair"], 2, "nope.png does not exist"),
    Case("score-old-reward", ["score", "nope.png", "-p", "a chair", "-r", "pickscore"], 2, "does not exist",
         note="-r is now --rewards"),
    # ---- usage ------------------------------------------------------------------------------------------------
    Case("unknown-option", ["generate", "x", "--bogus"], 2, "No such option"),
    Case("quiet-and-verbose", ["-q", "generate", "x", "-v"], 2, "--quiet and --verbose contradict"),
    Case("verbose-after-command", [*G, "--steps", "0", "-v"], 2, "--steps must be between 1 and 50"),
    Case("version", ["--version"], 0, "mvz 0."),
    Case("short-help", ["generate", "-h"], 0, "--skip-existing"),
]

DRIVER = r"""
import contextlib, io, json, os, sys, traceback
from mvz.cli import main

results = []
for case in json.loads(sys.argv[1]):
    os.chdir(case["cwd"])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(case["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # a case that escapes main() fails its own row, not the table
            code = "escaped"
            traceback.print_exc(file=err)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def _make(folder: Path, setup: dict[str, str]) -> None:
    for name, text in setup.items():
        p = folder / name
        if text == "/":
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text, encoding="utf-8")


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): ("/" if p.is_dir() else p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def early_results(tmp_path_factory):
    """Run every EARLY case in one interpreter; returns {case id: (result, folder, tree before)}."""
    base = tmp_path_factory.mktemp("early")
    payload, before = [], {}
    for case in EARLY:
        folder = base / case.id
        folder.mkdir()
        _make(folder, case.setup)
        before[case.id] = _tree(folder)
        payload.append({"argv": case.argv, "cwd": str(folder)})
    env = {**os.environ, "PYTHONPATH": str(REPO), "MVZ_HOME": str(base / "home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(payload)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return {case.id: (res, base / case.id, before[case.id]) for case, res in zip(EARLY, results, strict=True)}


@pytest.mark.parametrize("case", EARLY, ids=[c.id for c in EARLY])
def test_early(case: Case, early_results):
    res, folder, before = early_results[case.id]
    assert res["code"] == case.code, res
    lines = [ln for ln in res["err"].splitlines() if ln.strip()]
    assert "Traceback" not in res["err"]
    if case.code == 0:
        assert case.message in res["out"], res["out"]
    else:
        assert lines and lines[-1].startswith(("error:", "Usage:", "Try", "╰")) or "No such option" in res["err"], lines
        assert case.message in res["err"], res["err"]
        error_lines = [ln for ln in lines if ln.startswith("error:")]
        assert len(error_lines) <= 1, lines
    if case.note:
        assert lines[0].startswith("note:") and case.note in lines[0], lines
    assert not res["torch"], f"{case.id}: torch was imported before the refusal"
    assert _tree(folder) == before, f"{case.id} left something behind: {_tree(folder)}"


# ---- real signals -----------------------------------------------------------------------------------------------
def _spawn(argv: list[str], cwd: Path, home: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MVZ_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.Popen([*prefix, sys.executable, "-m", "mvz", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 300) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return seen
    proc.kill()
    pytest.fail(f"child never printed {marker!r}: {''.join(seen)}")


# signal -> exit code, last stderr line:
#   SIGINT  while one prompt samples      -> 130, "interrupted; nothing written"                  (and no file at all)
#   SIGTERM after the first grid of a batch -> 143, "interrupted; K of N grids in g; resume with the same command plus
#                                              --skip-existing"                                  (no temp file)


def test_sigint_during_generate_writes_nothing(tmp_path, tiny_model):
    proc = _spawn(["generate", "a chair", "--model", "tiny", "--steps", "50", "--out", "o.png", "--save-views", "-v",
                   "--device", "cpu"], tmp_path, Path(os.environ["MVZ_HOME"]))
    _wait_for_line(proc, "[mvz] sampling")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; nothing written" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no grid, no view, no temp file


def test_sigterm_during_a_batch_then_resume_with_skip_existing(tmp_path, tiny_model):
    """SIGTERM once the first grid exists: exit 143 naming --skip-existing; the resumed run keeps that grid."""
    (tmp_path / "p.txt").write_text("a cat\na dog\na frog\n" * 20, encoding="utf-8")
    argv = ["generate", "--prompts", "p.txt", "--model", "tiny", "--steps", "2", "--out-dir", "g", "--device", "cpu"]
    proc = _spawn([*argv, "-v"], tmp_path, Path(os.environ["MVZ_HOME"]))
    _wait_for_line(proc, "[mvz] sampling prompts 2-2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; ") and "resume with the same command plus --skip-existing" in last, last
    done = sorted((tmp_path / "g").glob("*.png"))
    assert done and not list((tmp_path / "g").glob(".*")), "a finished grid and no temp files"
    for extra in done[3:]:  # the resumed run below has the first 3 prompts only
        extra.unlink()
    done = done[:3]
    kept = {p: p.stat().st_mtime_ns for p in done}

    # the same command without a policy refuses; with --skip-existing it makes only the rest (3 prompts here)
    (tmp_path / "p.txt").write_text("a cat\na dog\na frog\n", encoding="utf-8")
    proc = _spawn(argv, tmp_path, Path(os.environ["MVZ_HOME"]))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "grids exist" in err and "--skip-existing" in err, err
    proc = _spawn([*argv, "--skip-existing"], tmp_path, Path(os.environ["MVZ_HOME"]))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert {p: p.stat().st_mtime_ns for p in done} == kept
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == ["000_a-cat.png", "001_a-dog.png", "002_a-frog.png"]
    assert f"{2 * (3 - len(done))}/{2 * (3 - len(done))} steps" in err  # the progress bar leaves its final line
    assert out.count("wrote") == 3 - len(done)


SLOW_SIGNALS = [
    # (id, argv, marker to wait for, exit code, last line (with {cwd}), what must not exist afterwards)
    ("export-SIGINT", ["export", "--model", "tiny", "--onnx-only", "--out", "exp", "-v", "--device", "cpu"],
     "[mvz] export stage unet: export started", 130, "interrupted; nothing written", ["exp"]),
    ("train-SIGINT", ["train", "--preset", "tiny", "--run-dir", "run", "--device", "cpu", "-v"],
     "[mvz] run folder run", 130, "interrupted; resume with: mvz train --resume run", ["run/epoch_0"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case_id, argv, marker, code, line, absent", SLOW_SIGNALS, ids=[c[0] for c in SLOW_SIGNALS])
def test_sigint_during_export_and_train(tmp_path, tiny_model, case_id, argv, marker, code, line, absent):
    proc = _spawn(argv, tmp_path, Path(os.environ["MVZ_HOME"]))
    _wait_for_line(proc, marker)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    for rel in absent:
        assert not (tmp_path / rel).exists(), rel
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".cache"]  # no temp folder


# ---- folders a user may not write ---------------------------------------------------------------------------------
DROP_OVERRIDE = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search")


def _non_root_prefix() -> tuple[str, ...]:
    """How to run a child that obeys permission bits. Root ignores them through CAP_DAC_OVERRIDE, so as root the
    child runs under ``setpriv`` without that capability (the same as a non-root user for files it does not own:
    ``nobody`` itself cannot be used here, the interpreter may live under root's 0700 home)."""
    if os.geteuid() != 0:
        return ()
    probe = subprocess.run([*DROP_OVERRIDE, "sh", "-c", "exit 0"], capture_output=True) if _which("setpriv") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE: permission bits cannot be tested")
    return DROP_OVERRIDE


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


@pytest.fixture()
def shared_tmp():
    """A folder outside pytest's 0700 tmp tree that another user can enter: ro/ is read-only, rw/ writable."""
    base = Path(tempfile.mkdtemp(prefix="mvz-perm-"))
    os.chmod(base, 0o755)
    (base / "ro").mkdir(mode=0o555)
    os.chmod(base / "ro", 0o555)
    (base / "rw").mkdir()
    os.chmod(base / "rw", 0o777)
    yield base
    import shutil

    shutil.rmtree(base, ignore_errors=True)


READ_ONLY = [
    # (id, argv with {ro}/{rw} placeholders, MVZ_HOME, message)
    ("generate-out", ["generate", "x", "--model", "tiny", "--out", "{ro}/sub/o.png"], "{rw}/home",
     "error: the folder of --out {ro}/sub is not writable (Permission denied)."),
    ("export-out", ["export", "--model", "tiny", "--out", "{ro}/exp"], "{rw}/home",
     "error: export folder's parent {ro} is not writable (Permission denied)."),
    ("train-run-dir", ["train", "--preset", "tiny", "--run-dir", "{ro}/run", "--device", "cpu"], "{rw}/home",
     "error: --run-dir {ro}/run is not writable (Permission denied)."),
    ("mvz-home", ["generate", "x", "--model", "tiny", "--steps", "1", "--out", "{rw}/o.png", "--device", "cpu"],
     "{ro}/home", "(it is under MVZ_HOME={ro}/home; point MVZ_HOME at a writable folder)"),
]


@pytest.mark.parametrize("case_id, argv, home, message", READ_ONLY, ids=[c[0] for c in READ_ONLY])
def test_read_only_folder_is_one_line(shared_tmp, case_id, argv, home, message):
    prefix = _non_root_prefix()
    fill = {"ro": str(shared_tmp / "ro"), "rw": str(shared_tmp / "rw")}
    argv = [a.format(**fill) for a in argv]
    proc = _spawn(argv, shared_tmp / "rw", Path(home.format(**fill)), prefix)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message.format(**fill) in lines[0], lines
    assert not any((shared_tmp / "ro").iterdir()) and sorted(p.name for p in (shared_tmp / "rw").iterdir()) in (
        [], ["home"], [".cache"], [".cache", "home"])


# ---- umask and the temp folders of killed writers -------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_folders_honour_the_umask(tmp_path, umask, mode):
    from mvz.atomic import atomic_dir, write_text

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "export") as tmp:
            write_text(tmp / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "export").stat().st_mode & 0o777 == mode
    assert (tmp_path / "export" / "f.txt").stat().st_mode & 0o777 == mode & 0o666


def test_killed_writers_temp_folder_is_removed_by_the_next_one(tmp_path):
    from mvz.atomic import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".export.{int(dead.stdout)}.abcd.tmp"  # what a SIGKILLed export leaves
    (stale / "unet.onnx").parent.mkdir()
    (stale / "unet.onnx").write_bytes(b"half")
    live = tmp_path / f".export.{os.getppid()}.efgh.tmp"  # another live writer's: left alone
    live.mkdir()
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export"]


# ---- small contracts ---------------------------------------------------------------------------------------------
VOCABULARY = [
    # (argv in, argv out, notes)
    (["score", "g.png", "-r", "hpsv2", "--preset", "tiny"], ["score", "g.png", "--rewards", "hpsv2", "--reward-preset", "tiny"], 2),
    (["bench", "--engines-dir=e", "--batch", "2"], ["bench", "--engines=e", "--batch-size", "2"], 2),
    (["generate", "x", "-v", "--steps", "2"], ["--verbose", "generate", "x", "--steps", "2"], 0),
    (["train", "-p", "tiny", "-q"], ["--quiet", "train", "--preset", "tiny"], 1),
    (["generate", "--", "-v"], ["generate", "--", "-v"], 0),
    (["score", "g.png", "-v", "4"], ["score", "g.png", "--views", "4"], 1),  # the old score -v N, for one release
    (["score", "g.png", "-v"], ["--verbose", "score", "g.png"], 0),
]


@pytest.mark.parametrize("argv, expected, notes", VOCABULARY)
def test_old_spellings_and_global_flags(argv, expected, notes):
    from mvz.cli.vocabulary import normalize

    got, said = normalize(argv)
    assert got == expected and len(said) == notes


def test_prompt_file_bom_is_stripped(tmp_path):
    from mvz.prompts import read_prompt_file

    (tmp_path / "p.txt").write_bytes("\ufeffa cat\r\na dog\n".encode())
    assert read_prompt_file(tmp_path / "p.txt") == ["a cat", "a dog"]


def test_piped_output_does_not_wrap(capsys):
    from rich.table import Table

    from mvz.cli import output

    out = output.console(stderr=False)
    out.print("word " * 60)
    table = Table("graph", "detail")
    table.add_row("unet", "word " * 40)
    out.print(table)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].rstrip() == ("word " * 60).rstrip()  # a line, not wrapped
    assert sum("word" in ln for ln in lines[1:]) == 1  # a table cell, not wrapped either


def test_step_limit_is_the_schedulers():
    from mvz.cli.checks import MAX_STEPS
    from mvz.scheduler import ORIGINAL_INFERENCE_STEPS

    assert MAX_STEPS == ORIGINAL_INFERENCE_STEPS


def test_memory_refusal_is_a_lower_bound():
    from mvz.cli.checks import min_bytes

    # the float32 images alone of 6 views at 768 px: 6 * 3 * 768^2 * 4 bytes; the bound must not be below it
    assert min_bytes(768, 6, 1) >= 6 * 3 * 768 * 768 * 4
    assert min_bytes(768, 6, 1) < 2**30  # and a normal request is far from any refusal
