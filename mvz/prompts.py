"""Prompt files: one prompt a line, blank lines and ``#`` comments skipped, a UTF-8 BOM ignored."""

from __future__ import annotations

from pathlib import Path

from mvz.errors import InputError


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and ``#`` comments skipped. Empty or missing file is an error.

    A byte-order mark (what Windows editors put first) is dropped, not made part of the first prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist.", "Pass a text file with one prompt per line.")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {path}: {exc}.", "Pass a UTF-8 text file.") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts.", "Write one prompt per line.")
    return prompts
