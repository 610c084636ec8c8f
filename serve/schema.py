"""The HTTP request body and the checks that need the server's limits; every error names its field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mvz import spec as sp
from serve.runner import BatchKey, Limits, Work

H = sp.HOUSE_LIMITS


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
    seed: int = Field(sp.DEFAULT_SEED, ge=0, le=sp.SEED_MAX,
                      description="Seeds the initial noise and every step (same seed, same pixels).")
    steps: int = Field(sp.DEFAULT_STEPS, ge=1, le=H.max_steps, description="LCM steps.")
    guidance: float = Field(sp.DEFAULT_GUIDANCE, ge=H.guidance[0], le=H.guidance[1], allow_inf_nan=False,
                            description="Guidance scale (w = g - 1).")
    views: int | None = Field(None, ge=1, le=H.max_views, description="Number of views (default 6, or len(azimuths)).")
    azimuths: list[float] | None = Field(None, min_length=1, max_length=H.max_views, description="Azimuths in degrees.")
    elevation: float = Field(0.0, ge=H.elevation[0], le=H.elevation[1], allow_inf_nan=False,
                             description="Camera elevation in degrees.")
    resolution: int | None = Field(None, ge=1, le=H.max_resolution, description="Image side in pixels (default: the model's).")
    zmv: bool = Field(False, description="ZMV-Sampling (first-step zigzag).")
    zmv_steps: int = Field(1, ge=1, le=H.max_steps, description="Steps that zigzag when zmv is on (<= steps).")
    lora_scale: float | None = Field(None, ge=H.lora_scale_range[0], le=H.lora_scale_range[1], allow_inf_nan=False,
                                     description="LoRA scale (torch backends with a LoRA only).")
    timeout_s: float | None = Field(None, ge=1.0, le=3600.0, allow_inf_nan=False,
                                    description="This request's timeout in seconds, 1 or more (at most the server's --timeout-s).")
    format: Literal["png", "json"] = Field("png", description="png: the 1xV grid; json: per-view PNGs (base64) + metadata.")


def resolve(body: GenerateBody, limits: Limits) -> tuple[BatchKey, Work]:
    """Check ``body`` against what this server serves (``mvz.spec``'s rules, each error naming its body field);
    return its batch key (the sampling spec) and its work item."""
    if not body.prompt.strip():
        raise FieldError("prompt", "the prompt is empty; give it some text.")
    try:
        spec = sp.SampleSpec.build(
            views=body.views, azimuths=body.azimuths, resolution=body.resolution, label=sp.field_label,
            steps=body.steps, guidance=float(body.guidance), elevation=float(body.elevation), zmv=body.zmv,
            zmv_steps=body.zmv_steps if body.zmv else 1,
            lora_scale=body.lora_scale if body.lora_scale is not None else limits.lora_scale)
    except sp.SpecError as err:
        raise FieldError(err.field, str(err)) from None
    try:
        spec = spec.sized(limits.fixed_resolution or limits.default_resolution).check(limits, sp.field_label)
    except sp.SpecError as err:  # a view count given as azimuths is blamed on them
        field = "azimuths" if err.field == "views" and body.azimuths is not None else err.field
        raise FieldError(field, str(err)) from None
    return spec, Work(body.prompt.strip(), body.seed)
