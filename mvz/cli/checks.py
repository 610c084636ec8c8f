"""Numbers checked before anything loads (no torch import): a bad flag costs milliseconds, not seconds.

Each check raises ``InputError`` with one line saying what is wrong and what to do.
"""

from __future__ import annotations

import os

from mvz.errors import InputError
from mvz.spec import HOUSE_LIMITS, MAX_STEPS, SEED_MAX  # noqa: F401  (MAX_STEPS: re-exported for the CLI)
from mvz.spec import finite_in as spec_finite

RESOLUTION_MULTIPLE = 8  # the VAE's factor; the model's own multiple (32 for SDXL) is checked once it is loaded


def finite(value: float, flag: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` is a real number (no NaN/inf) inside [low, high] (the wording of ``mvz.spec``)."""
    return spec_finite(value, flag, lambda _: flag, low, high)


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
    return finite(value, "--elevation", low=HOUSE_LIMITS.elevation[0], high=HOUSE_LIMITS.elevation[1])


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


def steps(value: int, flag: str = "--steps") -> int:
    if not 1 <= value <= MAX_STEPS:
        raise InputError(f"{flag} must be between 1 and {MAX_STEPS} (LCM's {MAX_STEPS} original steps), got {value}.")
    return value
