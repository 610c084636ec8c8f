"""The benchmark's backends: deployment sessions (``engines.session``) over the registry's backends.

Any ``MvzError`` a session raises (``BackendUnavailableError``, a missing or mismatched export) makes that
backend "skipped" with the error's one-line message; a refused refit is rebuilt by the session, as in
``mvz generate`` and ``mvz serve``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engines import registry
from mvz.errors import MvzError


def __getattr__(name: str):
    if name == "KNOWN_BACKENDS":  # the registry's names, as they are now
        return registry.backend_names()
    raise AttributeError(name)


def availability() -> dict[str, str | None]:
    """{name: None if available else the reason}."""
    return registry.available()


def open_backend(name: str, model, *, engines_dir, num_views: int, height: int, width: int, batch: int, device,
                 log: Callable[[str], None] | None = None, **options):
    """A session of backend ``name`` over ``model`` (``options`` to the backends that take them), or raise the
    ``MvzError`` saying why not."""
    from engines.session import BackendSpec, open_session

    spec = BackendSpec(name, Path(engines_dir) if engines_dir else None, num_views=num_views, height=height,
                       width=width, batch=batch, device=device, options=options)
    return open_session(model, spec, say=log)


def build_engines(name: str, export_dir, log) -> dict:
    """Build (or reuse: the build skips engines that are up to date) backend ``name``'s engines of an export
    folder. Returns a report entry: {"folder", "engines", "seconds"} or {"error"}."""
    build = registry.get(name).build
    log(f"building {name} engines in {export_dir} (reused when up to date)")
    t = time.perf_counter()
    try:
        em = build(export_dir)
    except MvzError as exc:
        log(f"{name} build failed: {exc}")
        return {"folder": str(export_dir), "error": str(exc)}
    engines = getattr(em, "engines", {}) or {}
    return {"folder": str(export_dir), "engines": sorted(engines), "seconds": time.perf_counter() - t}


def torch_backend(model, num_views: int):
    """Eager torch over ``model`` (the fidelity reference), as the registry makes it."""
    return registry.get("torch").create(model, num_views=num_views, device=model.device)
