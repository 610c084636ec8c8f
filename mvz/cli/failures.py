"""Operating-system failures a user can fix, as one line (no traceback)."""

from __future__ import annotations

import errno
import os

from mvz.paths import mvz_home

# errno -> (what happened, what to do)
_FIXABLE = {
    errno.EACCES: ("permission denied", "Choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "Choose a folder you can write to"),
    errno.EROFS: ("read-only file system", "Choose a folder on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "Free some space or choose another disk"),
    errno.EDQUOT: ("disk quota exceeded", "Free some space or choose another disk"),
    errno.EISDIR: ("it is a folder", "Name a file, not a folder"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Check the path"),
}


def describe_os_error(exc: OSError) -> str | None:
    """``cannot write /x/y: permission denied. Choose a folder ...`` or None for an error that is a bug."""
    if exc.errno not in _FIXABLE:
        return None
    what, fix = _FIXABLE[exc.errno]
    path = exc.filename or "a file"
    hint = ""
    try:
        home = str(mvz_home().absolute())
        if exc.filename and (os.path.abspath(exc.filename) + os.sep).startswith(home + os.sep):
            hint = f" (it is under MVZ_HOME={mvz_home()}; point MVZ_HOME at a writable folder)"
    except OSError:
        pass
    return f"cannot write {path}: {what}{hint}. {fix}."
