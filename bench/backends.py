"""Backends for the benchmark, through ``engines`` when it is installed; skipped with a reason otherwise.

``engines.create_backend(name, model, *, engines_dir, num_views, height, width, batch, device)`` returns an
object with ``.denoiser``, ``.decoder``, ``.name`` and ``.info`` (and optionally ``.stream``, the CUDA
stream it runs on). Any ``MvzError`` it raises (``BackendUnavailableError``, a missing or mismatched
export) makes that backend "skipped" with the error's one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mvz.errors import BackendUnavailableError, MvzError

KNOWN_BACKENDS = ("torch", "torch-compile", "torch-cudagraph", "onnxruntime", "tensorrt")


@dataclass
class TorchBackend:
    """Eager PyTorch, straight from ``mvz.pipeline`` (used when ``engines`` is not importable)."""

    denoiser: object
    decoder: object
    name: str = "torch"
    info: dict = field(default_factory=dict)
    stream: object = None


def torch_backend(model, num_views: int) -> TorchBackend:
    from mvz.pipeline import TorchDecoder, TorchDenoiser

    return TorchBackend(TorchDenoiser(model, num_views), TorchDecoder(model),
                        info={"implementation": "mvz.pipeline.TorchDenoiser (eager)", "dtype": str(model.dtype)})


def _engines():
    try:
        import engines
    except ImportError:
        return None
    if not hasattr(engines, "create_backend"):
        return None
    return engines


def availability() -> dict[str, str | None]:
    """{name: None if available else the reason}."""
    eng = _engines()
    if eng is None:
        reason = "the engines package is not installed in this build"
        return {n: (None if n == "torch" else reason) for n in KNOWN_BACKENDS}
    try:
        avail = dict(eng.available_backends())
    except Exception as exc:  # a broken optional dependency must not stop the benchmark
        return {n: (None if n == "torch" else f"engines.available_backends() failed: {exc}") for n in KNOWN_BACKENDS}
    for n in KNOWN_BACKENDS:
        avail.setdefault(n, "not provided by engines")
    return avail


def create(name: str, model, *, engines_dir, num_views: int, height: int, width: int, batch: int, device):
    """A backend object, or raise ``BackendUnavailableError`` (or another ``MvzError``) saying why not."""
    eng = _engines()
    if eng is None:
        if name == "torch":
            return torch_backend(model, num_views)
        raise BackendUnavailableError(f"backend {name!r} needs the engines package, which is not installed here.")
    try:
        return eng.create_backend(name, model, engines_dir=engines_dir, num_views=num_views, height=height,
                                  width=width, batch=batch, device=device)
    except MvzError:
        raise
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not available: {exc}.") from None
