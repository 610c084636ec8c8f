"""The backends, each described once: what it needs, how it serves a LoRA, how it is made.

Adding a backend is one module (its ``create``) and one :func:`register` call; ``mvz generate``, ``mvz serve``,
``mvz bench`` and :func:`engines.session.open_session` read everything they need from its
:class:`BackendEntry`. Importing this module imports no torch and no exporter: creators are imported when
a backend is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mvz.errors import BackendUnavailableError, InputError

LoraMode = Literal["live", "refit", "fusion"]  # LoRA layers run live | switched by refit | fused in at export


@dataclass(frozen=True)
class BackendEntry:
    """One backend. ``create(model, *, engines_dir, num_views, height, width, batch, device, **options)``
    returns an ``engines.base.Backend``; ``unavailable_reason()`` says (one line, with the fix) why it cannot
    run here, or None; ``build(export_dir)`` makes its engines from an export; ``rebuild(model, engines_dir, why, say)``, when set, makes engines for the model's LoRA
    after a refused refit and returns their folder (only the session calls it)."""

    name: str
    create: Callable[..., Any]
    unavailable_reason: Callable[[], str | None] = lambda: None
    needs_export: bool = False  # reads an mvz export folder (--engines)
    lora: LoraMode = "live"
    lora_scale_per_call: bool = False  # a request may change the LoRA scale without rebuilding anything
    rewrites_model: bool = False  # optimises the model's UNet in place (others sharing the model see it)
    options: tuple[str, ...] = ()  # the create() options it understands
    rebuild: Callable[..., Any] | None = None
    build: Callable[..., Any] | None = None  # build(export_dir) -> engines from an export (reused when up to date)


_REGISTRY: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> BackendEntry:
    """Add (or replace) a backend; it is usable at once from every entry point."""
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> BackendEntry:
    """The entry of ``name``, or the one-line error listing the known backends."""
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}.", f"Use one of: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def available() -> dict[str, str | None]:
    """name -> None if usable here, else the reason it is not."""
    return {name: entry.unavailable_reason() for name, entry in _REGISTRY.items()}


# ---- the built-in backends -------------------------------------------------------------------------------
def _torch_create(name: str):
    def create(model, *, num_views, device, engines_dir=None, height=None, width=None, batch=1, **options):
        from engines.torch_backend import create_torch_backend

        return create_torch_backend(name, model, num_views=num_views, device=device, **options)

    return create


def _onnxruntime_create(model, *, engines_dir, num_views, height, width, batch, device, providers=None):
    from engines.onnxruntime_backend import create_onnxruntime_backend

    return create_onnxruntime_backend(model, engines_dir, num_views=num_views, height=height, width=width,
                                      batch=batch, device=device, providers=providers)


def _onnxruntime_unavailable() -> str | None:
    from engines.onnxruntime_backend import unavailable_reason

    return unavailable_reason()


def _tensorrt_create(model, *, engines_dir, num_views, height, width, batch, device, cuda_graph=True,
                     release_torch=True):
    from engines.tensorrt_backend import create_tensorrt_backend, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    return create_tensorrt_backend(model, engines_dir, num_views=num_views, height=height, width=width, batch=batch,
                                   device=device, cuda_graph=bool(cuda_graph), release_torch=bool(release_torch))


def _tensorrt_unavailable() -> str | None:
    from engines.tensorrt_backend import unavailable_reason

    return unavailable_reason()


def _tensorrt_build(export_dir):
    from engines.tensorrt_build import build_engines

    return build_engines(export_dir)


def _compile_unavailable() -> str | None:
    import torch

    return None if hasattr(torch, "compile") else "this torch has no torch.compile (needs torch >= 2.0)."


def _cuda_unavailable() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU (none visible here)."


TORCH_OPTIONS = ("compile_mode", "fused_qkv", "channels_last")
register(BackendEntry("torch", _torch_create("torch"), lora_scale_per_call=True))
register(BackendEntry("torch-compile", _torch_create("torch-compile"), _compile_unavailable, rewrites_model=True,
                      options=TORCH_OPTIONS))
register(BackendEntry("torch-cudagraph", _torch_create("torch-cudagraph"), _cuda_unavailable, rewrites_model=True,
                      options=TORCH_OPTIONS))
register(BackendEntry("onnxruntime", _onnxruntime_create, _onnxruntime_unavailable, needs_export=True,
                      lora="fusion", options=("providers",)))
register(BackendEntry("tensorrt", _tensorrt_create, _tensorrt_unavailable, needs_export=True, lora="refit",
                      options=("cuda_graph", "release_torch"), build=_tensorrt_build))
# TensorRT's ``rebuild`` is filled in by engines.session (the one engines module that may call the exporter),
# so this registry never imports the session that imports it.
