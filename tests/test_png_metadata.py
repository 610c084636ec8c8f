"""PNG metadata other tools read: written by mvz.atomic.save_image, read back by Pillow, every chunk parsed the way
ComfyUI (JSON for ``prompt``/``workflow``) and A1111 (the ``parameters`` grammar) parse it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from mvz.atomic import save_image
from mvz.models.camera_file import cameras_record
from mvz.models.cameras import CameraSet
from mvz.png_metadata import (
    CHUNKS,
    COMFYUI_JSON_KEYS,
    MAX_PROMPT_CHARS,
    TRUNCATION_MARKER,
    parse_parameters,
    png_text,
    read_png_text,
)
from mvz.sidecar import generation_record


def record(prompt="a red teapot, studio light", lora=None, model="sdxl-lcm", **extra):
    cameras = CameraSet()
    entry = generation_record(
        prompt=prompt, seed=1234, steps=8, guidance=7.0, zmv=False, zmv_steps=0,
        result=SimpleNamespace(nfe=8, timings={"sample_s": 1.0}), azimuths=cameras.azimuths,
        elevation=cameras.elevation, resolution=64, model_info=SimpleNamespace(name=model, sources={},
                                                                              random_weights=True),
        lora=lora, lora_scale=0.6 if lora else None, backend={"name": "torch"}, device="cpu", dtype="torch.float32",
        load_s=0.1, prompts_in_call=1)
    entry.update(extra)
    return entry


def written(tmp_path, entry, cameras=None) -> tuple[dict[str, str], dict]:
    path = save_image(tmp_path / "grid.png", Image.new("RGB", (8, 8), "grey"), text=png_text(entry, cameras))
    with Image.open(path) as image:
        raw = dict(image.text)
    return raw, read_png_text(path)


def comfyui_reads(raw: dict[str, str]) -> None:
    """ComfyUI's drop handler JSON-parses ``workflow`` and ``prompt`` when present: neither may hold plain text."""
    for key in COMFYUI_JSON_KEYS:
        if key in raw:
            json.loads(raw[key])


def test_every_chunk_parses_as_comfyui_and_a1111_read_it(tmp_path):
    cams = CameraSet()
    names = [f"grid_view{i}.png" for i in range(cams.num_views)]
    entry = record(lora="/runs/a/mvczigal_lcm_sdxl_lora.safetensors")
    raw, parsed = written(tmp_path, entry, cameras_record(cams, names, 64, 64))
    assert sorted(raw) == sorted(CHUNKS)
    comfyui_reads(raw)
    params = parsed["parameters"]
    assert params["Prompt"] == "a red teapot, studio light" and params["Negative prompt"] == ""
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"], params["Model"]) == \
        ("8", "LCM", "7.0", "1234", "64x64", "sdxl-lcm")
    assert params["Azimuths"] == ",".join(f"{a:g}" for a in cams.azimuths)
    assert params["LoRAs"] == "mvczigal_lcm_sdxl_lora.safetensors:0.6"
    mvz = parsed["mvz"]
    assert (mvz["prompt"], mvz["seed"], mvz["steps"], mvz["guidance"], mvz["model"]) == \
        (entry["prompt"], 1234, 8, 7.0, "sdxl-lcm")
    assert mvz["loras"] == [{"name": "mvczigal_lcm_sdxl_lora.safetensors", "weight": 0.6}]
    assert [v["azimuth"] for v in mvz["views"]] == list(cams.azimuths)
    assert mvz["cameras"]["camera_model"] == "ORTHOGRAPHIC" and len(mvz["cameras"]["frames"]) == cams.num_views
    assert "prompt_truncated" not in mvz


def test_hostile_prompt_and_names_survive_the_a1111_grammar(tmp_path):
    prompt = 'a cat,\nNegative prompt: blurry\nSteps: 99, Seed: 5 "quoted" ünïcode'
    entry = record(prompt=prompt, model="my,model: v2", loras=[{"path": "a,b.safetensors", "weight": 1.0},
                                                                  {"path": "style.safetensors", "weight": 0.25}])
    raw, parsed = written(tmp_path, entry)
    comfyui_reads(raw)
    params = parsed["parameters"]
    assert params["Prompt"] == " ".join(prompt.split())  # one line: no fake negative prompt, no fake pairs
    assert params["Negative prompt"] == "" and params["Steps"] == "8" and params["Seed"] == "1234"
    assert params["Model"] == "my,model: v2"
    assert params["LoRAs"] == "a,b.safetensors:1, style.safetensors:0.25"
    assert parsed["mvz"]["prompt"] == prompt  # the exact prompt, newlines included
    assert parsed["mvz"]["loras"] == [{"name": "a,b.safetensors", "weight": 1.0},
                                      {"name": "style.safetensors", "weight": 0.25}]


def test_a_10_mb_prompt_is_capped_with_a_marker_not_stored_twice(tmp_path):
    prompt = "teapot " * (10_000_000 // 7)
    raw, parsed = written(tmp_path, record(prompt=prompt))
    comfyui_reads(raw)
    assert sum(len(v.encode()) for v in raw.values()) < 4 * MAX_PROMPT_CHARS + 8192
    marker = TRUNCATION_MARKER.format(n=len(prompt) - MAX_PROMPT_CHARS)
    mvz = parsed["mvz"]
    assert mvz["prompt"] == prompt[:MAX_PROMPT_CHARS] + marker
    assert mvz["prompt_truncated"] is True and mvz["prompt_chars"] == len(prompt)
    assert parsed["parameters"]["Prompt"].endswith(marker.strip())
    assert parsed["parameters"]["Steps"] == "8"


def test_non_square_records_give_the_size_of_one_view(tmp_path):
    _, parsed = written(tmp_path, record(width=96, height=64))
    assert parsed["parameters"]["Size"] == "96x64"
    assert (parsed["mvz"]["width"], parsed["mvz"]["height"]) == (96, 64)


@pytest.mark.parametrize("text, want", [
    ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512",
     {"Prompt": "a cat", "Negative prompt": "dog", "Sampler": "Euler a", "Size": "512x512"}),
    ('multi\nline\nSteps: 4, Seed: 2, Lora hashes: "a: 1, b: 2"',
     {"Prompt": "multi\nline", "Lora hashes": "a: 1, b: 2"}),
    ("just a prompt", {"Prompt": "just a prompt", "Negative prompt": ""}),
])
def test_parser_follows_a1111_on_its_own_infotexts(text, want):
    parsed = parse_parameters(text)
    assert {k: parsed[k] for k in want} == want
