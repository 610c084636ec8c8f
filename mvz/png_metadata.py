"""PNG text chunks that the ecosystem reads, built from one generation record (``mvz.sidecar.generation_record``).

Three chunks, no others:

- ``parameters``: A1111's infotext, which A1111, Forge, ComfyUI's drop-an-image import and civitai read:
  the prompt on one line, an optional ``Negative prompt:`` line, then one line of ``Key: value`` pairs
  separated by commas (``Steps: 8, Sampler: LCM, CFG scale: 7.0, Seed: 0, Size: 768x768, Model: sdxl-lcm, ...``).
  A value holding a comma, a colon or a newline is written as a JSON string, as A1111 does. Newlines in the
  prompt become spaces here (a prompt line starting ``Negative prompt:`` would otherwise be misread); the exact
  prompt is in ``mvz``. mvz has no negative prompt (the LCM w-embedding turns classifier-free guidance off).
- ``mvz``: mvz's own fields as one JSON object (format ``mvz-png/1``): prompt, seed, steps, guidance, model,
  LoRAs with their weights, views with their cameras, size, ZMV.
- ``Software``: the PNG keyword for the program that wrote the file.

Nothing goes under ``prompt`` or ``workflow``: ComfyUI JSON-parses those two as its own graph, and a plain-text
prompt there makes dropping an mvz image into ComfyUI fail.

**Caps.** The prompt appears in two chunks, so each copy is capped at ``MAX_PROMPT_CHARS`` characters: a longer
prompt is cut and ends with ``TRUNCATION_MARKER`` (naming how many characters were left out), and ``mvz`` says
``"prompt_truncated": true`` with the full ``prompt_chars``. The sidecar JSON keeps the whole prompt. Other free
text (model and LoRA names) is capped at ``MAX_NAME_CHARS`` the same way, so a 10 MB prompt costs at most a few
tens of kB of metadata per image, never 20 MB.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

FORMAT = "mvz-png/1"
MAX_PROMPT_CHARS = 8192
MAX_NAME_CHARS = 256
TRUNCATION_MARKER = " [mvz: truncated, {n} more characters]"
CHUNKS = ("parameters", "mvz", "Software")
COMFYUI_JSON_KEYS = ("prompt", "workflow")  # ComfyUI json-parses these; mvz never writes them

# A1111's own pattern for one ``Key: value`` pair of the last infotext line (AUTOMATIC1111/stable-diffusion-webui,
# modules/infotext_utils.py ``re_param_code``); values may be JSON strings.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def cap(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters plus the marker when longer; and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[:limit] + TRUNCATION_MARKER.format(n=len(text) - limit), True


def png_text(record: dict[str, Any], cameras: dict[str, Any] | None = None) -> dict[str, str]:
    """The text chunks for one image of a generation record; ``cameras`` is its ``cameras.json`` record
    (``mvz.models.camera_file.cameras_record``), when the caller has one."""
    import mvz

    return {"parameters": a1111_parameters(record), "mvz": json.dumps(mvz_fields(record, cameras), ensure_ascii=False),
            "Software": f"mvz {mvz.__version__}"}


def pnginfo(text: dict[str, str]):
    """Pillow's ``PngInfo`` holding ``text`` as iTXt chunks (UTF-8, so any prompt survives): the one way mvz puts
    text into a PNG, on disk (``mvz.atomic.save_image``) and over HTTP (``mvz serve``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    return info


def a1111_parameters(record: dict[str, Any]) -> str:
    """A1111's infotext for the record (see the module docstring for the grammar)."""
    prompt = " ".join(cap(str(record["prompt"]), MAX_PROMPT_CHARS)[0].split())
    width, height = _size(record)
    pairs = [("Steps", record["steps"]), ("Sampler", "LCM"), ("CFG scale", record["guidance"]),
             ("Seed", record["seed"]), ("Size", f"{width}x{height}"), ("Model", _name(record["model"])),
             ("Views", len(record.get("views") or [])),
             ("Azimuths", ",".join(f"{v['azimuth']:g}" for v in record.get("views") or []))]
    loras = _loras(record)
    if loras:
        pairs.append(("LoRAs", ", ".join(f"{lo['name']}:{lo['weight']:g}" for lo in loras)))
    if record.get("zmv"):
        pairs.append(("ZMV steps", record.get("zmv_steps", 0)))
    import mvz

    pairs.append(("Version", f"mvz {mvz.__version__}"))
    return f"{prompt}\n" + ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs if value != "")


def mvz_fields(record: dict[str, Any], cameras: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``mvz`` chunk: mvz's fields as JSON-ready values, free text capped."""
    prompt, cut = cap(str(record["prompt"]), MAX_PROMPT_CHARS)
    width, height = _size(record)
    fields: dict[str, Any] = {"format": FORMAT, "prompt": prompt}
    if cut:
        fields.update(prompt_truncated=True, prompt_chars=len(record["prompt"]))
    fields.update({"seed": record["seed"], "steps": record["steps"], "guidance": record["guidance"],
                   "model": _name(record["model"]), "loras": _loras(record), "width": width, "height": height,
                   "zmv": bool(record.get("zmv")), "zmv_steps": record.get("zmv_steps", 0),
                   "views": [{"azimuth": v["azimuth"], "elevation": v["elevation"]} for v in record.get("views") or []]})
    if cameras is not None:
        fields["cameras"] = cameras
    return fields


def _size(record: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of one view: explicit ones when the record has them, else the square resolution."""
    res = record.get("resolution")
    return int(record.get("width") or res), int(record.get("height") or res)


def _loras(record: dict[str, Any]) -> list[dict[str, Any]]:
    """[{name, weight}]: the record's LoRA stack (``loras``: [{path, weight}]) or its single ``lora``/``lora_scale``."""
    stack = record.get("loras")
    if stack is None:
        stack = [{"path": record["lora"], "weight": record.get("lora_scale", 1.0)}] if record.get("lora") else []
    return [{"name": _name(Path(str(item["path"])).name), "weight": float(item["weight"])} for item in stack]


def _name(text: str) -> str:
    return cap(str(text), MAX_NAME_CHARS)[0]


def _quote(value: str) -> str:
    """A1111's rule: a value with a comma, colon or newline is written as a JSON string."""
    return value if not any(c in value for c in ",:\n") else json.dumps(value, ensure_ascii=False)


# ---- reading back (tests, and users checking a file) ----------------------------------------------------------

def parse_parameters(text: str) -> dict[str, Any]:
    """Parse an infotext the way A1111 does (``parse_generation_parameters``): the last line holds the pairs if it
    has at least 3; the lines before are the prompt until one starts with ``Negative prompt:``."""
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in (raw.strip() for raw in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    parsed: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _A1111_PARAM.findall(last):
        parsed[key.strip()] = json.loads(value) if value[:1] == '"' and value[-1:] == '"' else value
    return parsed


def read_png_text(path: str | Path) -> dict[str, Any]:
    """The text chunks of a PNG as tools read them: ``mvz`` and ComfyUI's keys JSON-parsed, ``parameters`` by
    A1111's grammar, the rest as text."""
    from PIL import Image

    with Image.open(path) as image:
        chunks = dict(image.text)
    out: dict[str, Any] = {}
    for key, value in chunks.items():
        if key in ("mvz", *COMFYUI_JSON_KEYS):
            out[key] = json.loads(value)
        elif key == "parameters":
            out[key] = parse_parameters(value)
        else:
            out[key] = value
    return out
