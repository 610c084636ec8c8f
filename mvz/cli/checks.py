"""Numbers checked before anything loads (no torch import): a bad flag costs milliseconds, not seconds.

Each check raises ``InputError`` with one line saying what is wrong and what to do.
"""

from __future__ import annotations

import math
import os

from mvz.errors import InputError

SEED_MAX = 2**63 - 1  # seeds are 0..2^63-1 (int64, what torch.Generator and JSON sidecars carry); negative refused
ELEVATION_LIMIT = 90.0  # degrees; the adapter was trained at 0, the maths breaks at the poles
RESOLUTION_MULTIPLE = 8  # the VAE's factor; the model's own multiple (32 for SDXL) is checked once it is loaded


def finite(value: float, flag: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` is a real number (no NaN/inf) inside [low, high]."""
    if not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, got {value}.", _range_hint(flag, low, high))
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{flag} must be in {_range(low, high)}, got {value:g}.", _range_hint(flag, low, high))
    return value


def _range(low, high) -> str:
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def _range_hint(flag: str, low, high) -> str:
    if low is None and high is None:
        return f"Pass {flag} as plain numbers (degrees)."
    return f"Pass {flag} as a plain number in {_range(low, high)}."


def at_least(value: int, flag: str, low: int = 1) -> int:
    if value < low:
        raise InputError(f"{flag} must be at least {low}, got {value}.")
    return value


def seed(value: int, count: int = 1, flag: str = "--seed") -> int:
    """Seeds are 0..2^63-1; prompt i uses ``seed + i``, so the last one must fit too."""
    if value < 0:
        raise InputError(f"{flag} must be 0 or more, got {value}.", "Seeds are 0..2^63-1; prompt i uses seed + i.")
    if value + max(count - 1, 0) > SEED_MAX:
        what = f"{flag} {value} is above 2^63-1" if count <= 1 else f"{flag} {value} + {count - 1} (one per prompt) passes 2^63-1"
        raise InputError(f"{what}.", "Pass a smaller --seed.")
    return value


def azimuths(values: list[float]) -> list[float]:
    for a in values:
        finite(a, "--azimuths")
    return values


def elevation(value: float) -> float:
    return finite(value, "--elevation", low=-ELEVATION_LIMIT, high=ELEVATION_LIMIT)


def resolution(value: int | None, flag: str = "--resolution") -> int | None:
    if value is None:
        return None
    if value < RESOLUTION_MULTIPLE or value % RESOLUTION_MULTIPLE:
        raise InputError(f"{flag} must be a positive multiple of {RESOLUTION_MULTIPLE}, got {value}.",
                         "Use e.g. 512 or 768 (SDXL needs a multiple of 32).")
    return value


# ---- memory ------------------------------------------------------------------------------------------------
VAE_TOP_CHANNELS = 128  # SDXL VAE decoder channels at full resolution (tiny: fewer; this is a lower bound)


def min_bytes(resolution: int, views: int, batch: int) -> int:
    """A lower bound on the working memory of one generation call, in bytes.

    Only what must exist at once: the float32 images of every view of every prompt, plus one full-resolution
    activation pair of the VAE's last block for one view (fp16). Real use is higher; a refusal on this bound
    is therefore never wrong.
    """
    images = batch * views * 3 * resolution * resolution * 4
    vae = 2 * VAE_TOP_CHANNELS * resolution * resolution * 2
    return images + vae


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fits_memory(resolution: int | None, views: int, batch: int, available: int | None = None, where: str = "this machine") -> None:
    """Refuse a size that cannot fit, with the estimate. ``available`` defaults to the host's RAM (a GPU with more
    memory than its host is not expected; the CUDA check runs again against the GPU once the device is known)."""
    if resolution is None:
        return
    available = host_memory_bytes() if available is None else available
    need = min_bytes(resolution, views, batch)
    if available and need > available:
        raise InputError(
            f"{batch} x {views} views at {resolution} px need at least {need / 2**30:,.1f} GiB; "
            f"{where} has {available / 2**30:,.1f} GiB.",
            "Lower --resolution, --views or --batch-size.")


MAX_STEPS = 50  # LCM's original inference steps (mvz.scheduler.ORIGINAL_INFERENCE_STEPS; a test keeps them equal)


def steps(value: int, flag: str = "--steps") -> int:
    if not 1 <= value <= MAX_STEPS:
        raise InputError(f"{flag} must be between 1 and {MAX_STEPS} (LCM's {MAX_STEPS} original steps), got {value}.")
    return value
