"""The Ray Serve deployment answers on the tiny model (local Ray on the CPU; slow: Ray start-up)."""

from __future__ import annotations

import socket
import threading

import pytest

from serve.runner import BatchKey, Work

pytestmark = pytest.mark.slow


def test_group_compatible_packs_same_keys_up_to_max_batch():
    from serve.ray_app import group_compatible

    a = BatchKey(steps=2, azimuths=(0.0,), height=64, width=64)
    b = BatchKey(steps=4, azimuths=(0.0,), height=64, width=64)
    items = [(a, Work("p", 0)), (b, Work("p", 1)), (a, Work("p", 2)), (a, Work("p", 3))]
    assert group_compatible(items, 2) == [[0, 2], [3], [1]]


def test_ray_serve_deployment_answers_on_tiny(tiny_model):
    ray = pytest.importorskip("ray")
    import httpx
    import numpy as np
    from ray import serve

    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline, images_to_grid
    from serve.ray_app import build_deployment
    from serve.runner import RunnerConfig
    from serve.server import ServeOptions

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = RunnerConfig(model="tiny", device="cpu", dtype="fp32")
        serve.run(build_deployment(cfg, ServeOptions(max_batch=2, batch_window_ms=2000, warmup=False)),
                  name="mvz", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/healthz", timeout=60).json() == {"status": "ready"}
        res: dict = {}
        bodies = [{"prompt": p, "seed": i, "steps": 2, "views": 2} for i, p in enumerate(["a red chair", "a blue mug"])]
        threads = [threading.Thread(target=lambda i=i: res.update({i: httpx.post(url + "/v1/generate", json=bodies[i],
                                                                                   timeout=300)})) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [res[i].status_code for i in (0, 1)] == [200, 200]
        assert [res[i].headers["X-Mvz-Batch"] for i in (0, 1)] == ["2", "2"]  # @serve.batch packed them
        assert httpx.post(url + "/v1/generate", json={"prompt": "x", "steps": 0}).status_code == 422

        import io

        from PIL import Image

        pipe = MultiviewPipeline(tiny_model)
        want = pipe.sample(["a blue mug"], [1], steps=2, cameras=CameraSet.default(2)).images[0]
        got = np.asarray(Image.open(io.BytesIO(res[1].content)).convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(images_to_grid(want), dtype=np.int16)).max() <= 1
    finally:
        serve.shutdown()
        ray.shutdown()
