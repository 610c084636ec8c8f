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


class NonFiniteError(MvzError):
    """A stage of sampling produced NaN or inf: no image is written from it (it would be all black)."""


def require_finite(tensor, stage: str, fix: str = "Check the LoRA and its scale, or use --dtype fp32.") -> None:
    """Raise ``NonFiniteError`` naming ``stage`` when ``tensor`` holds NaN or inf (no torch import here: the
    tensor's own methods do the check, so this module stays importable without torch)."""
    finite = tensor.isfinite()
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise NonFiniteError(f"the {stage} went non-finite ({bad} of {finite.numel()} values are NaN or inf); "
                             "no image was written.", fix)


def summarize_keys(keys, limit: int = 5) -> str:
    """``a, b, c (+12 more)``: key lists in one-line messages stay readable."""
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def describe_key_mismatch(found: dict, expected: dict, noun: str = "keys") -> str | None:
    """One-line summary of how a state dict differs from what a model expects, or None if it fits.

    ``found``/``expected`` map key -> tensor (anything with ``.shape``).
    """
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    bad = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing {noun} ({summarize_keys(missing, 3)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected {noun} ({summarize_keys(unexpected, 3)})")
    if bad:
        k = bad[0]
        parts.append(f"{len(bad)} wrong shapes (e.g. {k}: {tuple(found[k].shape)} vs {tuple(expected[k].shape)})")
    return "; ".join(parts) or None
