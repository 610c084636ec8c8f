"""Hostile inputs (issue 22, first part): one ``error:`` line, exit 2, nothing written, never a silent success.

Covered here: click's own usage errors, arguments that are not UTF-8, a set-but-empty ``MVZ_HOME``, prompts
from standard input, and LoRA files with non-finite / out-of-range / malformed tensors or metadata.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mvz.errors import CheckpointError, InputError


def _mvz(argv: list, tmp_path: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "mvz", *argv], cwd=tmp_path, env=env, input=stdin,
                          capture_output=True, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode("utf-8", "replace").strip().splitlines()
    assert result.returncode == 2, (result.returncode, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert b"Traceback" not in result.stderr
    return err[0]


USAGE_CASES = [
    (["generate", "x", "--steps", "nan"], "--steps"),
    (["generate", "x", "--seed", "1e3"], "--seed"),
    (["generate", "x", "--views", "abc"], "--views"),
    (["generate", "x", "--no-such-flag"], "--no-such-flag"),
    (["generate", "x", "--steps"], "--steps"),
    (["nosuchcmd"], "nosuchcmd"),
]


@pytest.mark.parametrize(("argv", "named"), USAGE_CASES, ids=[" ".join(a) for a, _ in USAGE_CASES])
def test_click_usage_errors_are_one_line(argv, named, tmp_path):
    line = _one_error_line(_mvz(argv, tmp_path))
    assert named in line and "--help" in line


def test_argument_with_invalid_utf8_is_one_line(tmp_path):
    line = _one_error_line(_mvz(["generate", b"a \xff\xfe frog", "--model", "tiny"], tmp_path))
    assert "argument 2" in line and "UTF-8" in line
    assert not list(tmp_path.iterdir())


def test_empty_mvz_home_is_the_default_not_the_current_folder(monkeypatch):
    from mvz.paths import mvz_home

    monkeypatch.setenv("MVZ_HOME", "")
    assert mvz_home() == Path.home() / ".cache" / "mvz"
    monkeypatch.setenv("MVZ_HOME", "  ")
    assert mvz_home() == Path.home() / ".cache" / "mvz"
    monkeypatch.setenv("MVZ_HOME", "/srv/mvz")
    assert mvz_home() == Path("/srv/mvz")


def test_prompts_from_stdin_dash(monkeypatch):
    import io

    from mvz.prompts import read_prompt_file

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfa frog\n# note\n\nan owl\n")))
    assert read_prompt_file("-") == ["a frog", "an owl"]


def test_prompts_from_a_pipe(tmp_path):
    from mvz.prompts import read_prompt_file

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"printf 'a lamp\\n' > '{fifo}'"])
    try:
        assert read_prompt_file(fifo) == ["a lamp"]
    finally:
        writer.wait(timeout=30)


def test_prompt_file_with_invalid_utf8_names_the_line(tmp_path):
    from mvz.prompts import read_prompt_file

    bad = tmp_path / "p.txt"
    bad.write_bytes(b"a frog\nan \xff owl\n")
    with pytest.raises(InputError, match="line 2"):
        read_prompt_file(bad)


def _lora(a=None, b=None, meta=None) -> dict:
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {f"{key}.lora_A.weight": torch.randn(4, 32) if a is None else a,
          f"{key}.lora_B.weight": torch.zeros(32, 4) if b is None else b}
    return {"sd": sd, "meta": {"format": "pt", **(meta or {})}}


BAD_LORAS = {
    "nan-weight": (_lora(b=torch.full((32, 4), float("nan"))), "NaN or inf"),
    "inf-weight": (_lora(a=torch.full((4, 32), float("inf"))), "NaN or inf"),
    "huge-weight": (_lora(b=torch.full((32, 4), 1e30)), "fp16"),
    "nan-alpha": (_lora(meta={"lora_alpha": "nan"}), "lora_alpha"),
    "inf-alpha": (_lora(meta={"lora_alpha": "inf"}), "lora_alpha"),
    "text-alpha": (_lora(meta={"lora_alpha": "eight"}), "lora_alpha"),
    "zero-alpha": (_lora(meta={"lora_alpha": "0"}), "lora_alpha"),
    "scalar-tensor": (_lora(a=torch.tensor(1.0)), "shape"),
    "rank-0": (_lora(a=torch.zeros(0, 32), b=torch.zeros(32, 0)), "shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_LORAS))
def test_bad_lora_file_is_refused_naming_the_problem(case, tmp_path):
    from mvz.models.lora import read_lora_file

    lora, expected = BAD_LORAS[case]
    path = tmp_path / "bad.safetensors"
    save_file(lora["sd"], str(path), metadata=lora["meta"])
    with pytest.raises(CheckpointError, match=expected) as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


def test_good_lora_file_still_loads(tmp_path):
    from mvz.models.lora import read_lora_file

    lora = _lora(meta={"lora_alpha": "8"})
    path = tmp_path / "ok.safetensors"
    save_file(lora["sd"], str(path), metadata=lora["meta"])
    sd, rank, alpha = read_lora_file(path)
    assert (rank, alpha) == (4, 8.0) and len(sd) == 2


def test_generate_with_nan_lora_writes_no_image(tmp_path):
    lora = _lora(b=torch.full((32, 4), float("nan")))
    path = tmp_path / "nan.safetensors"
    save_file(lora["sd"], str(path), metadata=lora["meta"])
    line = _one_error_line(_mvz(["generate", "a frog", "--model", "tiny", "--lora", str(path), "--steps", "1",
                                 "--out", "grid.png", "--save-views"], tmp_path))
    assert "NaN or inf" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_tiny_model_files_honour_the_umask(tmp_path):
    """A shared MVZ_HOME under umask 002: every file group-writable, none left 0600 by a library's mkstemp."""
    home = tmp_path / "home"
    code = "from mvz.models.loading import load_model; load_model('tiny', device='cpu', dtype='fp32')"
    env = {**os.environ, "MVZ_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=600,
                   preexec_fn=lambda: os.umask(0o002))
    modes = {p.relative_to(home).as_posix(): p.stat().st_mode & 0o777 for p in home.rglob("*")}
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert "models/tiny/unet/diffusion_pytorch_model.safetensors" in weights
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o775 if (home / name).is_dir() else 0o664)}
    assert not wrong


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: too small for the tiny model. Skips where this machine cannot mount one (not root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_mvz_home_on_a_full_disk_is_one_line_and_leaves_nothing(full_disk, tmp_path):
    env_home = {"MVZ_HOME": str(full_disk / "home")}
    env = {**os.environ, **env_home, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "mvz", "generate", "a frog", "--model", "tiny", "--steps", "1",
                             "--out", str(tmp_path / "g.png")], env=env, capture_output=True, timeout=600)
    line = _one_error_line(result)
    assert "no space left" in line and str(full_disk / "home") in line
    assert not (full_disk / "home" / "models").exists()
    assert not (tmp_path / "g.png").exists()


def test_atomic_write_on_a_full_disk_names_the_file(full_disk):
    from mvz.atomic import save_safetensors

    target = full_disk / "a" / "b" / "w.safetensors"
    with pytest.raises(OSError) as info:
        save_safetensors(target, {"w": torch.zeros(1 << 20)})
    assert info.value.filename == str(target) and info.value.errno == 28
    assert not (full_disk / "a").exists() and not list(full_disk.iterdir())


def test_score_refuses_a_decompression_bomb_in_one_line(tmp_path):
    """A 20000 x 20000 PNG (a few hundred KB on disk) must not surface Pillow's DecompressionBombError."""
    from PIL import Image

    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    line = _one_error_line(_mvz(["score", "bomb.png", "-p", "a chair", "--reward-preset", "tiny"], tmp_path))
    assert "bomb.png" in line and "Downscale" in line


def test_require_finite_names_the_stage():
    from mvz.errors import NonFiniteError, require_finite

    require_finite(torch.zeros(2, 3), "denoised latents")
    with pytest.raises(NonFiniteError, match=r"denoised latents went non-finite \(1 of 6"):
        require_finite(torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]]), "denoised latents")
    with pytest.raises(NonFiniteError, match="decoded images"):
        require_finite(torch.tensor([float("inf")]), "decoded images")


@pytest.fixture
def nan_backend():
    """A backend (registered in one place) whose denoiser returns NaN: what a diverged LoRA does to fp16."""
    from engines import registry

    def create(model, *, num_views, device, **_):
        backend = registry.get("torch").create(model, num_views=num_views, device=device)
        backend.denoiser = lambda *args, **kw: torch.full_like(args[0], float("nan"))
        backend.name = "nan-fake"
        return backend

    registry.register(registry.BackendEntry("nan-fake", create))
    yield "nan-fake"
    registry.unregister("nan-fake")


def test_generate_never_writes_an_image_from_nan_latents(nan_backend, tmp_path, capsys):
    from mvz.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["generate", "a red chair", "--model", "tiny", "--steps", "2", "--views", "2", "--device", "cpu",
              "--dtype", "fp32", "--backend", nan_backend, "--out", str(tmp_path / "g.png"), "--save-views"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the denoised latents went non-finite") and "no image was written" in err[-1]
    assert not list(tmp_path.iterdir())


def test_serve_takes_dash_m_like_every_command(tmp_path):
    """``-m`` is ``--model`` everywhere (the README's table): serve gets past it to the next check."""
    line = _one_error_line(_mvz(["serve", "-m", "tiny", "--port", "-1"], tmp_path))
    assert "--port" in line and "-m" not in line


BENCH_CASES = [
    (["--threads", "0"], "--threads must be at least 1"),
    (["--threads", "-1"], "--threads must be at least 1"),
    (["--fidelity-prompts", "0"], "--fidelity-prompts 0 compares nothing"),
    (["--latency-reward", "foo"], "--latency-reward 'foo' is not a reward"),
    (["--reference-dtype", "foo"], "--reference-dtype must be one of"),
]


@pytest.mark.parametrize(("extra", "message"), BENCH_CASES, ids=[" ".join(e) for e, _ in BENCH_CASES])
def test_bench_refuses_options_it_would_record_or_ignore(extra, message, tmp_path):
    line = _one_error_line(_mvz(["bench", "--model", "tiny", "--device", "cpu", "--out", "rep", *extra], tmp_path))
    assert message in line
    assert not list(tmp_path.iterdir())  # no report folder, nothing loaded
