"""How the CLI talks: verbosity (--quiet/--verbose), consoles that do not wrap piped output, log lines.

stdout carries results (paths written, tables, ``--json``); stderr carries progress, notes and errors.
``--quiet`` keeps stderr to errors; ``--verbose`` adds one log line per stage and lets the libraries
(diffusers, transformers) speak. Piped or redirected output is never wrapped at 80 columns.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

QUIET, NORMAL, VERBOSE = -1, 0, 1
_level = NORMAL
PIPE_WIDTH = 1000  # wide enough that no line of ours wraps when stdout/stderr is a file or a pipe


def set_verbosity(level: int) -> None:
    global _level
    _level = level
    if level >= VERBOSE:
        os.environ["MVZ_VERBOSE"] = "1"  # read by mvz.quiet: leave library logging on


def verbosity() -> int:
    return _level


def console(stderr: bool = True, quiet: bool = False):
    """A rich Console: stderr ones go silent under --quiet; a non-terminal gets a wide, unwrapped width."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPE_WIDTH
    return Console(stderr=stderr, width=width, quiet=quiet or (stderr and _level <= QUIET), soft_wrap=not stream.isatty())


def log(message: str) -> None:
    """One line on stderr under --verbose (stage starts, what was decided)."""
    if _level >= VERBOSE:
        print(f"[mvz] {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """One line on stderr unless --quiet (things the user should know: a truncated prompt, a skipped file)."""
    if _level > QUIET:
        print(f"note: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(*columns, console) -> Iterator:
    """A rich Progress that leaves its final state as one line when the work finishes, and nothing on an error
    or an interruption (the error line stays the only line)."""
    from rich.progress import Progress

    progress = Progress(*columns, console=console, transient=True)
    with progress:
        yield progress
    console.print(progress.make_tasks_table(progress.tasks))
