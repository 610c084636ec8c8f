"""Run the one-process service under uvicorn; SIGTERM/SIGINT drain the in-flight requests, then exit 0."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

from serve.runner import RunnerConfig, check_config, load_runner


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 4
    batch_window_ms: float = 20.0
    max_queue: int = 64
    timeout_s: float = 300.0
    warmup: bool = True
    log_level: str = "info"
    ui: bool = False  # the web page at / (serve.ui; the `ui` extra)
    root_path: str = ""  # the prefix a reverse proxy serves this under, e.g. /mvz


def check_options(opts: ServeOptions) -> None:
    from mvz.errors import InputError

    checks = [("--max-batch", opts.max_batch >= 1), ("--max-queue", opts.max_queue >= 1),
              ("--batch-window-ms", opts.batch_window_ms >= 0), ("--timeout-s", opts.timeout_s > 0),
              ("--port", 0 <= opts.port <= 65535)]
    if opts.root_path and (not opts.root_path.startswith("/") or opts.root_path.endswith("/")):
        raise InputError(f"--root-path {opts.root_path!r} is not a path prefix.", "Use e.g. --root-path /mvz (no trailing /).")
    if opts.ui and not ui_available():
        raise InputError("--ui needs Gradio, which is not installed.", 'pip install -e ".[ui]", or pass --no-ui.')
    for flag, ok in checks:
        if not ok:
            raise InputError(f"{flag} is out of range.", "Use a positive value (port 0-65535, window >= 0).")


def ui_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gradio") is not None


def build_app(cfg: RunnerConfig, opts: ServeOptions, on_fatal=None):
    from serve.app import create_app
    from serve.service import LocalService

    cfg.max_batch = opts.max_batch
    service = LocalService(lambda: load_runner(cfg), max_batch=opts.max_batch, window_s=opts.batch_window_ms / 1000,
                           max_queue=opts.max_queue, timeout_s=opts.timeout_s, warmup=opts.warmup, on_fatal=on_fatal)
    return create_app(service, ui=opts.ui), service


def run_server(cfg: RunnerConfig, opts: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a drain, 2 if the model failed to load)."""
    import uvicorn

    check_options(opts)
    check_config(cfg)
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fatal: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        server.should_exit = True

    app, _ = build_app(cfg, opts, on_fatal)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, lifespan="on",
                            root_path=opts.root_path,
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it drained on; these handlers make that re-raise a no-op -> exit 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if fatal:
        from mvz.errors import MvzError

        if isinstance(fatal[0], MvzError):
            raise fatal[0]
        return 1
    return 0


class ThreadedServer:
    """uvicorn in a background thread on loopback (tests, load-test dry runs); ``port=0`` picks a free port.

    ``with ThreadedServer(app) as srv: httpx.get(srv.url + "/healthz")``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.host = host
        self._thread = None

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        return f"http://{self.host}:{sock.getsockname()[1]}"

    def __enter__(self) -> ThreadedServer:
        import threading
        import time

        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
