"""User-facing failures.

Every error a user can cause is an ``MvzError`` whose message is one line saying what is wrong
and what to do. The CLI prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations


class MvzError(Exception):
    """A failure the user can fix. ``str(err)`` is the one-line message shown to them."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what} {fix}")


class InputError(MvzError):
    """Bad command-line or config input (empty prompt, steps 0, bad resolution...)."""


class ModelNotFoundError(MvzError):
    """A model component, checkpoint or reward weight is not on disk."""


class CheckpointError(MvzError):
    """A checkpoint of the wrong model, with missing/unexpected keys or wrong shapes."""


class DeviceError(MvzError):
    """The requested device or dtype is not usable here."""


class ManifestMismatchError(MvzError):
    """An artifact (export, engine, run) does not fit what it is used with."""


class BackendUnavailableError(MvzError):
    """A backend (TensorRT, ONNX Runtime provider, CUDA graphs) is not available here."""


class ConfigError(MvzError):
    """Unknown config key, wrong type, or a config that does not fit a run being resumed."""


class TrainingDivergedError(MvzError):
    """NaN or inf in the loss or the rewards."""


def summarize_keys(keys, limit: int = 5) -> str:
    """``a, b, c (+12 more)``: key lists in one-line messages stay readable."""
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
