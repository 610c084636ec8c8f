"""The HTTP request body and the checks that need the server's limits; every error names its field."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mvz.models.cameras import CameraSet
from serve.runner import BatchKey, Limits, Work


class FieldError(ValueError):
    """A request value the server cannot serve; ``field`` is the body field to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def detail(self) -> list[dict]:
        """FastAPI's own 422 shape, so clients parse one format."""
        return [{"loc": ["body", self.field], "msg": self.message, "type": "value_error"}]


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000, description="What to generate.")
    seed: int = Field(42, ge=0, le=2**63 - 1, description="Seeds the initial noise and every step (same seed, same pixels).")
    steps: int = Field(8, ge=1, le=50, description="LCM steps.")
    guidance: float = Field(7.0, ge=0.0, le=50.0, allow_inf_nan=False, description="Guidance scale (w = g - 1).")
    views: int | None = Field(None, ge=1, le=64, description="Number of views (default 6, or len(azimuths)).")
    azimuths: list[float] | None = Field(None, min_length=1, max_length=64, description="Azimuths in degrees.")
    elevation: float = Field(0.0, ge=-90.0, le=90.0, allow_inf_nan=False, description="Camera elevation in degrees.")
    resolution: int | None = Field(None, ge=1, le=8192, description="Image side in pixels (default: the model's).")
    zmv: bool = Field(False, description="ZMV-Sampling (first-step zigzag).")
    zmv_steps: int = Field(1, ge=1, le=50, description="Steps that zigzag when zmv is on (<= steps).")
    lora_scale: float | None = Field(None, ge=-10.0, le=10.0, allow_inf_nan=False,
                                     description="LoRA scale (torch backends with a LoRA only).")
    timeout_s: float | None = Field(None, ge=1.0, le=3600.0, allow_inf_nan=False,
                                    description="This request's timeout in seconds, 1 or more (at most the server's --timeout-s).")
    format: Literal["png", "json"] = Field("png", description="png: the 1xV grid; json: per-view PNGs (base64) + metadata.")


def resolve(body: GenerateBody, limits: Limits) -> tuple[BatchKey, Work]:
    """Check ``body`` against what this server serves; return its batch key and its work item."""
    if not body.prompt.strip():
        raise FieldError("prompt", "the prompt is empty; give it some text.")
    if body.azimuths is not None:
        if any(not math.isfinite(a) or abs(a) > 3600 for a in body.azimuths):
            raise FieldError("azimuths", "azimuths must be finite degrees within +-3600.")
        if body.views is not None and body.views != len(body.azimuths):
            raise FieldError("views", f"views {body.views} but {len(body.azimuths)} azimuths given; drop one or make them agree.")
        azimuths = tuple(float(a) for a in body.azimuths)
    else:
        azimuths = CameraSet.default(body.views).azimuths
    field = "azimuths" if body.azimuths is not None else "views"
    if limits.fixed_views is not None and len(azimuths) != limits.fixed_views:
        raise FieldError(field, f"this server's engines take {limits.fixed_views} views, got {len(azimuths)}.")
    if len(azimuths) > limits.max_views:
        raise FieldError(field, f"at most {limits.max_views} views, got {len(azimuths)}.")
    res = body.resolution or limits.fixed_resolution or limits.default_resolution
    if limits.fixed_resolution is not None and res != limits.fixed_resolution:
        raise FieldError("resolution", f"this server's engines take resolution {limits.fixed_resolution}, got {res}.")
    m = limits.resolution_multiple
    if res % m or res > limits.max_resolution:
        raise FieldError("resolution", f"resolution must be a multiple of {m} up to {limits.max_resolution}, got {res}.")
    if body.zmv and body.zmv_steps > body.steps:
        raise FieldError("zmv_steps", f"zmv_steps must be between 1 and steps ({body.steps}), got {body.zmv_steps}.")
    lora_scale = body.lora_scale
    if lora_scale is not None and lora_scale != limits.lora_scale:
        if limits.lora_scale is None:
            raise FieldError("lora_scale", "this server runs no LoRA; drop lora_scale.")
        if not limits.lora_scale_settable:
            raise FieldError("lora_scale", f"this backend has the LoRA baked in at scale {limits.lora_scale}; drop lora_scale.")
    if lora_scale is None:
        lora_scale = limits.lora_scale
    key = BatchKey(body.steps, azimuths, float(body.elevation), res, body.zmv, body.zmv_steps if body.zmv else 1,
                   float(body.guidance), lora_scale)
    return key, Work(body.prompt.strip(), body.seed)
