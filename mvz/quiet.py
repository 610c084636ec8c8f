"""Keep library chatter (progress bars, dtype notices) out of mvz's own output (``mvz --verbose`` keeps it)."""

from __future__ import annotations

import os

_done = False


def quiet_libraries() -> None:
    global _done
    if _done or os.environ.get("MVZ_VERBOSE") == "1":
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog  # core dependencies: always installed
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    _done = True
