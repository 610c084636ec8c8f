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


def create(name: str, model, *, engines_dir, num_views: int, height: int, width: int, batch: int, device, **options):
    """A backend object, or raise ``BackendUnavailableError`` (or another ``MvzError``) saying why not.
    ``options`` go to ``engines.create_backend`` (e.g. ``compile_mode``)."""
    eng = _engines()
    if eng is None:
        if name == "torch":
            return torch_backend(model, num_views)
        raise BackendUnavailableError(f"backend {name!r} needs the engines package, which is not installed here.")
    try:
        return eng.create_backend(name, model, engines_dir=engines_dir, num_views=num_views, height=height,
                                  width=width, batch=batch, device=device, **options)
    except MvzError:
        raise
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not available: {exc}.") from None


def tensorrt_builder():
    """The engine build API: ``engines.tensorrt_build.build_engines`` (the build half), or the older home in
    ``engines.tensorrt_backend``; None when neither exists."""
    try:
        from engines.tensorrt_build import build_engines
    except ImportError:
        try:
            from engines.tensorrt_backend import build_engines
        except ImportError:
            return None
    return build_engines


def build_tensorrt_engines(export_dir, log) -> dict:
    """Build (or reuse: the build skips engines that are up to date) the TensorRT engines of an export folder.
    Returns a report entry: {"folder", "engines", "seconds"} or {"error"}."""
    import time

    build = tensorrt_builder()
    if build is None:
        return {"folder": str(export_dir), "error": "no TensorRT build API in this engines package"}
    log(f"building TensorRT engines in {export_dir} (reused when up to date)")
    t = time.perf_counter()
    try:
        em = build(export_dir)
    except MvzError as exc:
        log(f"TensorRT build failed: {exc}")
        return {"folder": str(export_dir), "error": str(exc)}
    engines = getattr(em, "engines", {}) or {}
    return {"folder": str(export_dir), "engines": sorted(engines), "seconds": time.perf_counter() - t}
