"""Per-request LoRA scale (torch backend with --lora): requests of other scales never share a batch, and
each equals the pipeline at that scale."""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve.app import create_app
from serve.runner import RunnerConfig, load_runner
from serve.server import ThreadedServer
from serve.service import LocalService

pytestmark = pytest.mark.slow  # a second tiny model with a LoRA: ~40 s on 2 shared cores


def _lora_file(tmp_path, model):
    from mvz.models.lora import LORA_FILENAME, add_lora, save_lora

    add_lora(model.unet, rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the LoRA change something
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_lora(model.unet, tmp_path / LORA_FILENAME)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_lora_scale_per_request(tmp_path, fresh_tiny_model):
    from mvz.models.cameras import CameraSet
    from mvz.models.lora import set_lora_scale
    from mvz.pipeline import MultiviewPipeline, images_to_grid

    lora = _lora_file(tmp_path, fresh_tiny_model)
    runner = load_runner(RunnerConfig(model="tiny", lora=lora, device="cpu", dtype="fp32", max_batch=2))
    service = LocalService(lambda: runner, max_batch=2, window_s=2.0, max_queue=4, timeout_s=300, warmup=False)
    body = {"prompt": "a red chair", "seed": 3, "steps": 1, "views": 2}
    res: dict = {}
    with ThreadedServer(create_app(service)) as srv:
        while not service.ready:
            time.sleep(0.05)
        threads = [threading.Thread(target=lambda n=n, b=b: res.update({n: httpx.post(srv.url + "/v1/generate", json=b,
                                                                                         timeout=300)}))
                   for n, b in (("half", {**body, "lora_scale": 0.5}), ("full", body))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        meta = httpx.post(srv.url + "/v1/generate", json={**body, "lora_scale": 0.5, "format": "json"}, timeout=300)
    assert res["half"].status_code == res["full"].status_code == 200
    assert res["half"].headers["X-Mvz-Batch"] == res["full"].headers["X-Mvz-Batch"] == "1"  # never mixed
    assert meta.json()["metadata"]["lora_scale"] == 0.5 and meta.json()["metadata"]["lora"] == str(lora)

    pipe = MultiviewPipeline(runner.model)
    for name, scale in (("half", 0.5), ("full", 1.0)):
        set_lora_scale(runner.model.unet, scale)
        want = pipe.sample([body["prompt"]], [body["seed"]], steps=1, cameras=CameraSet.default(2)).images[0]
        diff = np.abs(_pixels(res[name].content) - np.asarray(images_to_grid(want), dtype=np.int16)).max()
        assert diff <= 1, f"lora_scale {scale}: {diff}"
    assert np.abs(_pixels(res["half"].content) - _pixels(res["full"].content)).max() > 1  # the scale matters
