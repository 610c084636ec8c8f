"""Ctrl-C and SIGTERM: stop cleanly, say in one line what was kept, exit 130 (SIGINT) or 143 (SIGTERM).

Both signals raise :class:`Interrupted` (a ``BaseException``, so no ``except Exception`` in a library swallows
it and every ``finally`` runs: atomic writes remove their temp files). A command that has written something
worth keeping says so with :func:`set_outcome` (e.g. "resume with mvz train --resume RUN"); the default is
"nothing written".
"""

from __future__ import annotations

import signal

NOTHING_WRITTEN = "nothing written"
_outcome = NOTHING_WRITTEN


class Interrupted(BaseException):  # noqa: N818  (a signal, not an error)
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # shell convention: 130 for SIGINT, 143 for SIGTERM


def _raise(signum: int, _frame) -> None:
    # a second signal during clean-up must not interrupt the clean-up itself
    signal.signal(signum, signal.SIG_IGN)
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to :class:`Interrupted` (main thread only, as Python requires)."""
    global _outcome
    _outcome = NOTHING_WRITTEN
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _raise)
        except ValueError:  # not the main thread (e.g. called from a test runner's worker): leave as is
            return


def set_outcome(text: str) -> None:
    """What an interruption from now on leaves behind, e.g. ``"3 grids written; resume with ... --skip-existing"``."""
    global _outcome
    _outcome = text


def message() -> str:
    return f"interrupted; {_outcome}"
