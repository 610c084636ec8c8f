"""A sampling request, defined once: :class:`SampleSpec` (what to sample) and :class:`Limits` (what is allowed).

Every entry point takes its defaults and numbers from here: ``mvz generate`` and ``mvz bench`` (their Typer
options), ``mvz serve`` (its request schema, and its batching key, which *is* a ``SampleSpec``) and
``mvz.pipeline`` (which samples a spec as it is). ``check(limits)`` raises :class:`SpecError` naming the field,
in the house's one-line form; each entry point only chooses how a field is spelled (``--zmv-steps`` on the
command line, ``zmv_steps`` in a JSON body). Imports no torch, so a bad flag fails in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from mvz.errors import InputError

DEFAULT_STEPS = 8
MAX_STEPS = 50  # LCM's original inference steps (mvz.scheduler.ORIGINAL_INFERENCE_STEPS; a test keeps them equal)
DEFAULT_GUIDANCE = 7.0
# the training cameras (mvz.models.cameras.DEFAULT_AZIMUTHS; a test keeps them equal)
DEFAULT_AZIMUTHS: tuple[float, ...] = (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)
SEED_MAX = 2**63 - 1  # int64: what torch.Generator and JSON sidecars carry
DEFAULT_SEED = 42

Label = Callable[[str], str]


def flag_label(name: str) -> str:
    """How the command line spells a field: ``zmv_steps`` -> ``--zmv-steps``."""
    return "--" + name.replace("_", "-")


def field_label(name: str) -> str:
    """How a JSON body spells a field: as it is."""
    return name


class SpecError(InputError):
    """A request value out of its limits; ``field`` is the :class:`SampleSpec` field to blame (``views`` and
    ``resolution`` stand for the azimuth count and the image side)."""

    def __init__(self, field_name: str, what: str, fix: str | None = None):
        super().__init__(what, fix)
        self.field = field_name


@dataclass(frozen=True)
class Limits:
    """What a deployment accepts. The defaults are the house's numbers; a session narrows them to what its
    engines were built for (fixed views/resolution, a LoRA scale baked in)."""

    max_steps: int = MAX_STEPS
    guidance: tuple[float, float] = (0.0, 100.0)
    lora_scale_range: tuple[float, float] = (-10.0, 10.0)
    elevation: tuple[float, float] = (-90.0, 90.0)  # the adapter was trained at 0; the maths breaks at the poles
    max_abs_azimuth: float = 3600.0
    max_views: int = 64
    resolution_multiple: int = 8  # the VAE's factor; a loaded model narrows it (32 for SDXL)
    max_resolution: int = 8192
    default_resolution: int | None = None  # the model's (768 for sdxl-lcm)
    fixed_views: int | None = None  # exported graphs: the views they were exported for
    fixed_resolution: int | None = None  # exported graphs: the resolution they were exported for
    lora_scale: float | None = None  # the scale the deployment runs (None: no LoRA)
    lora_scale_settable: bool = False  # whether a request may change it per call

    def narrowed(self, **changes) -> Limits:
        return replace(self, **changes)


HOUSE_LIMITS = Limits()


def default_azimuths(views: int | None) -> tuple[float, ...]:
    """The training cameras for 6 views (or none given); for another count, evenly spaced azimuths from 0."""
    if views is None or views == len(DEFAULT_AZIMUTHS):
        return DEFAULT_AZIMUTHS
    return tuple(360.0 * i / views for i in range(views))


@dataclass(frozen=True)
class SampleSpec:
    """Everything of one sampling call but the prompts and seeds. Frozen and hashable: requests with equal
    specs share one UNet call per step. ``height``/``width`` None mean the model's default size."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    azimuths: tuple[float, ...] = DEFAULT_AZIMUTHS
    elevation: float = 0.0
    height: int | None = None
    width: int | None = None
    zmv: bool = False
    zmv_steps: int = 1
    lora_scale: float | None = None

    @classmethod
    def build(cls, *, views: int | None = None, azimuths=None, resolution: int | None = None,
              label: Label = flag_label, **fields) -> SampleSpec:
        """A spec from the user's words: ``views`` and ``azimuths`` must agree (either may be omitted);
        ``resolution`` is the side of a square image."""
        if azimuths is not None:
            azimuths = tuple(float(a) for a in azimuths)
            if not azimuths:
                raise SpecError("azimuths", f"{label('azimuths')} is empty.", "Give degrees, e.g. 0,90,180,270.")
            if views is not None and views != len(azimuths):
                raise SpecError("views", f"{label('views')} {views} but {len(azimuths)} {label('azimuths')} given.",
                                f"Drop {label('views')} or make them agree.")
        else:
            if views is not None and views < 1:
                raise SpecError("views", f"{label('views')} must be at least 1, got {views}.")
            azimuths = default_azimuths(views)
        if resolution is not None:
            fields.setdefault("height", resolution)
            fields.setdefault("width", resolution)
        return cls(azimuths=azimuths, **fields)

    @property
    def views(self) -> int:
        return len(self.azimuths)

    def sized(self, default_resolution: int) -> SampleSpec:
        """This spec with the image size filled in (the model's default where none was given)."""
        return replace(self, height=self.height or default_resolution, width=self.width or default_resolution)

    def check(self, limits: Limits = HOUSE_LIMITS, label: Label = flag_label) -> SampleSpec:
        """Raise :class:`SpecError` for the first field out of ``limits``; return ``self``."""
        lim = limits
        if not 1 <= self.steps <= lim.max_steps:
            raise SpecError("steps", f"{label('steps')} must be between 1 and {lim.max_steps} "
                            f"(LCM's {MAX_STEPS} original steps), got {self.steps}.")
        finite_in(self.guidance, "guidance", label, *lim.guidance)
        _check_cameras(self, lim, label)
        _check_size(self, lim, label)
        if self.zmv and not 1 <= self.zmv_steps <= self.steps:
            raise SpecError("zmv_steps", f"{label('zmv_steps')} must be between 1 and {label('steps')} ({self.steps}), "
                            f"got {self.zmv_steps}.")
        _check_lora_scale(self.lora_scale, lim, label)
        return self


def _check_cameras(spec: SampleSpec, lim: Limits, label: Label) -> None:
    finite_in(spec.elevation, "elevation", label, *lim.elevation)
    for a in spec.azimuths:
        finite_in(a, "azimuths", label, -lim.max_abs_azimuth, lim.max_abs_azimuth)
    v = spec.views
    if v < 1:
        raise SpecError("views", f"{label('views')} must be at least 1, got {v}.")
    if lim.fixed_views is not None and v != lim.fixed_views:
        raise SpecError("views", f"these engines take {lim.fixed_views} views, got {v}.",
                        f"Ask for {lim.fixed_views} views, or export for {v}.")
    if v > lim.max_views:
        raise SpecError("views", f"{label('views')} must be at most {lim.max_views}, got {v}.")


def _check_size(spec: SampleSpec, lim: Limits, label: Label) -> None:
    square = spec.height == spec.width
    for side, value in (("height", spec.height), ("width", spec.width)):
        if value is None:
            continue
        name = "resolution" if square else side
        if lim.fixed_resolution is not None and value != lim.fixed_resolution:
            raise SpecError(name, f"these engines take resolution {lim.fixed_resolution}, got {value}.",
                            f"Ask for {lim.fixed_resolution}, or export for {value}.")
        m = lim.resolution_multiple
        if value < m or value % m:
            raise SpecError(name, f"{label(name)} {value} is not a positive multiple of {m}, which this model needs.",
                            f"Use e.g. {max(m, round(value / m) * m)}.")
        if value > lim.max_resolution:
            raise SpecError(name, f"{label(name)} must be at most {lim.max_resolution}, got {value}.")


def _check_lora_scale(scale: float | None, lim: Limits, label: Label) -> None:
    if scale is None:
        return
    finite_in(scale, "lora_scale", label, *lim.lora_scale_range)
    if scale == lim.lora_scale or lim.lora_scale_settable:
        return
    if lim.lora_scale is None:
        raise SpecError("lora_scale", "this deployment runs no LoRA.", f"Drop {label('lora_scale')}.")
    raise SpecError("lora_scale", f"this backend has the LoRA baked in at scale {lim.lora_scale:g}.",
                    f"Drop {label('lora_scale')}, or use a torch backend to change it per call.")


def finite_in(value: float, name: str, label: Label, low: float | None = None, high: float | None = None) -> float:
    """``value`` is a real number (no NaN/inf) inside [low, high]; the error names ``name``."""
    if not math.isfinite(value):
        raise SpecError(name, f"{label(name)} must be a finite number, got {value}.", range_hint(label(name), low, high))
    if (low is not None and value < low) or (high is not None and value > high):
        raise SpecError(name, f"{label(name)} must be in {format_range(low, high)}, got {value:g}.",
                        range_hint(label(name), low, high))
    return value


def format_range(low, high) -> str:
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def range_hint(flag: str, low, high) -> str:
    if low is None and high is None:
        return f"Pass {flag} as plain numbers (degrees)."
    return f"Pass {flag} as a plain number in {format_range(low, high)}."
