"""A real `mvz serve` subprocess: SIGTERM while a request is in flight answers it, then exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_helpers import free_port, wait_ready


def _in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mvz_in_flight "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow  # a real mvz serve subprocess (about 20 s); CI runs it with -m slow
def test_sigterm_drains_in_flight_requests_and_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvz", "serve", "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
         "--port", str(port), "--no-warmup", "--batch-window-ms", "0"],
        env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_ready(proc, url)

        result: dict = {}
        body = {"prompt": "a red chair", "steps": 4, "views": 2}
        client = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/generate", json=body, timeout=240)))
        client.start()
        while _in_flight(url) < 1:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        client.join(240)
        rc = proc.wait(timeout=120)
        out = proc.stdout.read()
        assert result["r"].status_code == 200, out
        assert result["r"].content[:8] == b"\x89PNG\r\n\x1a\n"
        assert rc == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
