"""Stage timers: ``perf_counter`` on the CPU, CUDA events on the backend's stream on the GPU.

On CUDA, ``stage()`` records a start and an end event on the given stream (default: the current stream of
the device) without synchronising, so timing does not perturb the pipeline; :meth:`StageTimer.collect`
synchronises once after the run and reads ``elapsed_time`` of every pair. Wall time of the whole run is
taken with ``perf_counter`` after a ``torch.cuda.synchronize`` on both ends.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class StageTimer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []
        self.samples: dict[str, list[float]] = defaultdict(list)  # name -> seconds (per occurrence)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str, stream=None):
        if self.cuda:
            stream = stream or torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._pending.append((name, t0, time.perf_counter()))

    def collect(self) -> dict[str, list[float]]:
        """Resolve this run's stages: {name: [seconds, ...]} (appended to ``samples`` as well)."""
        run: dict[str, list[float]] = defaultdict(list)
        if self.cuda and self._pending:
            self._pending[-1][2].synchronize()
            self.sync()
        for name, a, b in self._pending:
            sec = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            run[name].append(sec)
            self.samples[name].append(sec)
        self._pending.clear()
        return dict(run)

    def discard(self) -> None:
        self.sync()
        self._pending.clear()


class TimedDenoiser:
    """Wraps a Denoiser: every call is one stage ``unet_step`` timed on the backend's stream."""

    def __init__(self, inner, timer: StageTimer, stream=None):
        self.inner = inner
        self.timer = timer
        self.stream = stream

    @property
    def num_views(self):
        return getattr(self.inner, "num_views", None)

    @num_views.setter
    def num_views(self, value):
        if hasattr(self.inner, "num_views"):
            self.inner.num_views = value

    def __call__(self, *args):
        with self.timer.stage("unet_step", self.stream):
            return self.inner(*args)


class TimedDecoder:
    def __init__(self, inner, timer: StageTimer, stream=None):
        self.inner = inner
        self.timer = timer
        self.stream = stream

    def __call__(self, latents):
        with self.timer.stage("vae_decode", self.stream):
            return self.inner(latents)


@contextlib.contextmanager
def timed_model_stages(model, timer: StageTimer):
    """Time ``encode_prompts`` (text_encode) and ``camera_residuals`` (camera_residuals) of a model.

    The residual cache is emptied on entry so the adapter really runs (a served model caches it per
    camera set; the report says so). Instance attributes shadow the methods and are removed on exit.
    """
    enc, cam = model.encode_prompts, model.camera_residuals

    def encode_prompts(*a, **k):
        with timer.stage("text_encode"):
            return enc(*a, **k)

    def camera_residuals(*a, **k):
        with timer.stage("camera_residuals"):
            return cam(*a, **k)

    model.clear_residual_cache()  # so the camera stage is really measured each run
    model.encode_prompts = encode_prompts
    model.camera_residuals = camera_residuals
    try:
        yield
    finally:
        del model.encode_prompts
        del model.camera_residuals


def _reset_process_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _process_peak_rss_mb() -> float | None:
    """VmHWM (peak RSS since start or since the last reset) in MiB; ru_maxrss (since start) as a fallback."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None


def peak_memory_reset(device: torch.device) -> bool:
    """Start a peak-memory window (after the warm-up). Returns whether the process peak RSS was reset too."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _reset_process_peak_rss()


def peak_memory_mb(device: torch.device, rss_reset: bool = False) -> dict:
    """Peak memory of the window opened by :func:`peak_memory_reset` (MiB).

    GPU: the torch allocator's peaks (they miss what ONNX Runtime / TensorRT allocate themselves) and
    ``device_used_mb``, the whole device's used memory at the end (every allocator and process, so it
    includes engines, workspaces and torch's cached pool). Process peak RSS: this window when the kernel
    mark could be reset (``process_peak_rss_scope`` says which).
    """
    out: dict = {}
    if device.type == "cuda":
        out["torch_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["torch_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        try:
            free, total = torch.cuda.mem_get_info(device)
            out["device_used_mb"] = (total - free) / 2**20
        except RuntimeError:
            pass
    rss = _process_peak_rss_mb()
    if rss is not None:
        out["process_peak_rss_mb"] = rss
        out["process_peak_rss_scope"] = "timed runs" if rss_reset else "process lifetime"
    return out
