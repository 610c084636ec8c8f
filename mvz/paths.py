"""Where mvz keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def mvz_home() -> Path:
    """``$MVZ_HOME``, default ``~/.cache/mvz``."""
    return Path(os.environ.get("MVZ_HOME", Path.home() / ".cache" / "mvz")).expanduser()


def models_dir() -> Path:
    return mvz_home() / "models"


def rewards_dir() -> Path:
    return mvz_home() / "rewards"
