"""`mvz serve` refuses bad input with one line and exit 2 (before loading anything, or when the load fails)."""

from __future__ import annotations

import pytest

from mvz.cli import main


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--backend", "bogus"], "unknown backend"),
        (["--backend", "onnxruntime"], "--engines"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "0"], "--max-queue"),
        (["--lora", "/nonexistent/lora.safetensors"], "does not exist"),
        (["--model", "/nonexistent/model-folder", "--no-warmup"], "nonexistent"),
    ],
)
def test_bad_serve_input_exits_2_with_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "tiny", "--port", "0", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and says in error_lines[0], err
    assert "Traceback" not in err
