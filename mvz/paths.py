"""Where mvz keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def mvz_home() -> Path:
    """``$MVZ_HOME``, default ``~/.cache/mvz``. Set but empty counts as unset (as XDG does for its
    variables), so ``MVZ_HOME=`` never means "the current folder"."""
    home = os.environ.get("MVZ_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mvz"


def models_dir() -> Path:
    return mvz_home() / "models"


def rewards_dir() -> Path:
    return mvz_home() / "rewards"
