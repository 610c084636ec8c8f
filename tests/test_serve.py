"""mvz serve on the tiny model: concurrent requests share one batch and each equals `mvz generate` for
its seed (pixels and sidecar metadata); every bad field is a 422 naming it. One model, one server."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.app import create_app
from serve.runner import RunnerConfig, make_runner
from serve.server import ThreadedServer
from serve.service import LocalService

PROMPTS = ["a red chair", "a blue mug", "a green lamp"]
SEED = 10
COMMON = {"steps": 2, "views": 2}


@pytest.fixture(scope="module")
def server(tiny_model):
    runner = make_runner(tiny_model, RunnerConfig(max_batch=4))
    # a wide window: on a loaded 2-core machine the three clients must still land in one batch
    service = LocalService(lambda: runner, max_batch=4, window_s=3.0, max_queue=8, timeout_s=300, warmup=False)
    with ThreadedServer(create_app(service)) as srv:
        yield srv.url


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _grid_from_views(views_b64: list[str]) -> np.ndarray:
    return np.concatenate([_pixels(base64.b64decode(v)) for v in views_b64], axis=1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """`mvz generate` one prompt at a time (batch size 1), seeds SEED, SEED+1, ... with per-view sidecars."""
    from mvz.cli.generate_impl import GenerateRequest, run_generate

    tmp = tmp_path_factory.mktemp("gen")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    paths = run_generate(GenerateRequest(prompts_file=tmp / "prompts.txt", model="tiny", seed=SEED, batch_size=1,
                                         out_dir=tmp / "out", save_views=True, device="cpu", dtype="fp32",
                                         json_out=True, **COMMON))
    return [(_pixels(p.read_bytes()), json.loads(p.with_suffix(".json").read_text())) for p in paths]


def test_concurrent_requests_are_batched_and_equal_generate(server, generated):
    results: dict[int, httpx.Response] = {}

    def client(i: int) -> None:
        body = {"prompt": PROMPTS[i], "seed": SEED + i, **COMMON, "format": "json" if i == 0 else "png"}
        results[i] = httpx.post(server + "/v1/generate", json=body, timeout=300)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), {i: r.text[:200] for i, r in results.items()}

    metrics = httpx.get(server + "/metrics").text
    assert 'mvz_batch_size_bucket{le="1.0"} 0.0' in metrics  # no batch of one...
    assert "mvz_batch_size_sum 3.0" in metrics and "mvz_batch_size_count 1.0" in metrics  # ...one batch of 3
    assert [results[i].headers["X-Mvz-Batch"] for i in (1, 2)] == ["3", "3"]

    body0 = results[0].json()
    served = [_grid_from_views(body0["images"])] + [_pixels(results[i].content) for i in (1, 2)]
    for i, (want, _) in enumerate(generated):
        assert served[i].shape == want.shape
        assert np.abs(served[i] - want).max() <= 1, f"prompt {i} differs from mvz generate"
    assert np.abs(served[0] - generated[1][0]).max() > 1  # another seed/prompt is visibly another image

    sidecar = generated[0][1]
    meta = body0["metadata"]
    assert set(meta) == set(sidecar) - {"grid", "view_files", "cameras"}  # the files generate wrote
    for k in set(meta) - {"timings"}:
        assert meta[k] == sidecar[k], k
    assert meta["timings"]["prompts_in_call"] == 3


BAD = [
    ({"seed": 1}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": "one"}, "seed"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 51}, "steps"),
    ({"prompt": "x", "guidance": -1}, "guidance"),
    ({"prompt": "x", "views": 0}, "views"),
    ({"prompt": "x", "views": 17}, "views"),
    ({"prompt": "x", "views": 3, "azimuths": [0, 90]}, "views"),
    ({"prompt": "x", "azimuths": []}, "azimuths"),
    ({"prompt": "x", "azimuths": ["north"]}, "azimuths"),
    ({"prompt": "x", "elevation": 91}, "elevation"),
    ({"prompt": "x", "resolution": 30}, "resolution"),
    ({"prompt": "x", "resolution": 4096}, "resolution"),
    ({"prompt": "x", "steps": 2, "zmv": True, "zmv_steps": 3}, "zmv_steps"),
    ({"prompt": "x", "lora_scale": 0.5}, "lora_scale"),
    ({"prompt": "x", "timeout_s": 0}, "timeout_s"),
    ({"prompt": "x", "format": "gif"}, "format"),
    ({"prompt": "x", "colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_field_is_422_naming_it(server, body, field):
    r = httpx.post(server + "/v1/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert any(field in err["loc"] for err in r.json()["detail"]), r.json()


def test_malformed_json_is_422(server):
    r = httpx.post(server + "/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
