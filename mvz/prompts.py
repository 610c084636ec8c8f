"""Prompt files: one prompt a line, blank lines and ``#`` comments skipped, a UTF-8 BOM ignored."""

from __future__ import annotations

import sys
from pathlib import Path

from mvz.errors import InputError

STDIN = "-"


def _read_bytes(path: Path) -> bytes:
    """A regular file, or ``-`` / a pipe / ``/dev/stdin`` (anything readable that is not a folder)."""
    if str(path) == STDIN:
        return sys.stdin.buffer.read()
    if not path.exists() or path.is_dir():
        raise InputError(f"prompt file {path} does not exist.", "Pass a text file with one prompt per line (or - for stdin).")
    try:
        with open(path, "rb") as handle:  # open() rather than read_bytes(): pipes and /dev/stdin have no size
            return handle.read()
    except OSError as exc:
        raise InputError(f"cannot read prompt file {path}: {exc.strerror or exc}.", "Pass a readable text file.") from None


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and ``#`` comments skipped. Empty or missing file is an error.

    ``-`` (or a pipe, ``/dev/stdin``) reads standard input. A byte-order mark (what Windows editors put
    first) is dropped, not made part of the first prompt.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"prompt file {path} is not UTF-8 text (bad bytes on line {line}).",
                         "Save it as UTF-8.") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts.", "Write one prompt per line.")
    return prompts
