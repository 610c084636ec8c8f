"""The export manifest (``mvz_export.json``): what a folder of ONNX graphs is, and whether it fits a request.

A consumer (``engines``, ``mvz generate --backend``) reads the manifest first and refuses an export that was
made for another model, LoRA (file hash and scale), number of views, resolution, batch or precision, with a
message that says how to re-export.

Integrity: every file that carries weights (``.onnx`` and its external ``.onnx.data``) is recorded with its
full, streamed sha256 and checked at load, so a data file swapped in from another export (another LoRA) is
refused. The manifest carries a digest of its own content (``content_sha256``), so an edited hash is caught;
the engine manifest records the sha256 of this file, so engines never serve another export's weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvz.devices import library_versions  # noqa: F401  (recorded in every manifest; the exporter's import)
from mvz.errors import CheckpointError, ManifestMismatchError, ModelNotFoundError

MANIFEST_NAME = "mvz_export.json"
FORMAT = "mvz-export"
FORMAT_VERSION = 2  # 2: full sha256 of external data files + content digest
HASH_CACHE_NAME = "file_hashes.json"


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """Full sha256 of a file, streamed (constant memory for multi-GB weight files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_key(path: Path) -> str:
    st = path.stat()  # ctime changes on any write or metadata change and cannot be set back by the user
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def cached_sha256(path: str | Path) -> str:
    """Full sha256 of a source weight file, remembered in ``$MVZ_HOME/file_hashes.json`` by (path, size,
    mtime, ctime, inode) so multi-GB model files are read once, not on every command."""
    import json

    from mvz.paths import mvz_home

    path = Path(path)
    key = _file_key(path)
    cache_path = mvz_home() / HASH_CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache[key] = digest
    try:
        from mvz.atomic import write_json

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, cache)
    except OSError:  # a read-only home only costs the re-hash next time
        pass
    return digest


def model_fingerprint(model) -> str:
    """Identity of a loaded MultiviewModel's weights (without any LoRA): the weight files it came from.

    Random-weight models have no files; their fingerprint hashes the UNet and VAE parameters (cheap for the
    tiny preset, a few seconds for the full-size architecture)."""
    info = model.info
    h = hashlib.sha256(f"{info.name}|random={info.random_weights}".encode())
    files: list[Path] = []
    for key in ("unet", "vae", "adapter"):
        src = info.sources.get(key)
        if not src:
            continue
        p = Path(src)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")))
    if files and not info.random_weights:
        for f in files:
            h.update(f.name.encode())
            h.update(cached_sha256(f).encode())
    else:
        import torch

        with torch.no_grad():
            for module in (model.unet, model.vae):
                for name, t in sorted(module.state_dict().items()):
                    if "lora_" in name:
                        continue
                    # an attached PEFT LoRA renames the wrapped weights (``to_q.base_layer.weight``)
                    h.update(name.replace(".base_layer.", ".").encode())
                    h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def lora_identity(path: str | Path | None, scale: float) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        from mvz.models.lora import LORA_FILENAME

        p = p / LORA_FILENAME
    if not p.is_file():
        raise ModelNotFoundError(f"LoRA file {p} does not exist.", "Pass the path of a LoRA .safetensors file.")
    return {"path": str(p), "sha256": sha256_file(p), "scale": float(scale)}


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]
    dtype: str  # numpy-style: float16, float32

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], list(d["shape"]), d["dtype"])


@dataclass
class GraphEntry:
    file: str
    external_data: str | None
    sha256: str  # full sha256 of the .onnx protobuf
    bytes: int  # graph + external data
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str
    parity: dict[str, Any] = field(default_factory=dict)
    external_data_sha256: str | None = None  # full sha256 of the external data file

    @classmethod
    def from_dict(cls, d: dict) -> GraphEntry:
        if d.get("external_data") and not d.get("external_data_sha256"):
            raise ValueError(f"graph {d['file']} has external data without a hash")
        return cls(
            d["file"], d.get("external_data"), d["sha256"], int(d["bytes"]),
            [TensorSpec.from_dict(t) for t in d["inputs"]], [TensorSpec.from_dict(t) for t in d["outputs"]],
            d["precision"], dict(d.get("parity", {})), d.get("external_data_sha256"),
        )

    def weight_files(self) -> list[tuple[str, str]]:
        """(file name, sha256) of every file that carries this graph's weights."""
        files = [(self.file, self.sha256)]
        if self.external_data:
            files.append((self.external_data, str(self.external_data_sha256)))
        return files


@dataclass
class ExportManifest:
    model: dict[str, Any]  # name, fingerprint, sources, random_weights
    lora: dict[str, Any] | None  # path, sha256, scale (rank, alpha) or None
    num_views: int
    height: int
    width: int
    batch: int  # prompts per call (the UNet sees batch * num_views rows)
    dynamic_batch: bool
    precision: str  # fp16 | fp32 | int8 | fp8 (UNet)
    vae_precision: str
    opset: int
    exporter: str
    graphs: dict[str, GraphEntry]
    versions: dict[str, str] = field(default_factory=dict)
    refit_map: str | None = None
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    quantization: dict[str, Any] | None = None  # int8/fp8: base dtype, calibration hash/prompts/figures (export.quantize)

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["content_sha256"] = content_digest(d)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExportManifest:
        return cls(
            model=dict(d["model"]), lora=d.get("lora"), num_views=int(d["num_views"]), height=int(d["height"]),
            width=int(d["width"]), batch=int(d["batch"]), dynamic_batch=bool(d["dynamic_batch"]),
            precision=d["precision"], vae_precision=d["vae_precision"], opset=int(d["opset"]), exporter=d["exporter"],
            graphs={k: GraphEntry.from_dict(v) for k, v in d["graphs"].items()}, versions=dict(d.get("versions", {})),
            refit_map=d.get("refit_map"), created=d.get("created", ""), format=d.get("format", FORMAT),
            format_version=int(d.get("format_version", FORMAT_VERSION)), quantization=d.get("quantization"),
        )

    def save(self, folder: str | Path) -> Path:
        from mvz.atomic import write_json

        return write_json(Path(folder) / MANIFEST_NAME, self.to_dict())

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model.get("name"),
            "lora": (Path(self.lora["path"]).name + f" x{self.lora['scale']}") if self.lora else None,
            "views": self.num_views,
            "resolution": f"{self.width}x{self.height}",
            "batch": self.batch,
            "dynamic_batch": self.dynamic_batch,
            "precision": self.precision,
            "vae_precision": self.vae_precision,
            "opset": self.opset,
            "exporter": self.exporter,
        }

    def reexport_hint(self, folder: str | Path | None = None) -> str:
        return "Re-export for this request: mvz export --model MODEL [--lora FILE --lora-scale S] --views V " \
               f"--resolution R --batch B --precision P --out {folder or 'DIR'} --force."


def read_manifest(folder: str | Path) -> ExportManifest:
    """Read and validate the manifest of an export folder; one-line errors for missing or corrupt ones."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ModelNotFoundError(f"export folder {folder} does not exist.", "Create it with: mvz export --model MODEL --out DIR.")
    if not path.is_file():
        raise ModelNotFoundError(
            f"{folder} holds no mvz export ({MANIFEST_NAME} missing).", "Create one with: mvz export --model MODEL --out DIR."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format version {data.get('format_version')} is newer than this mvz")
        if int(data.get("format_version", 0)) < FORMAT_VERSION:
            raise ValueError(f"format version {data.get('format_version')} predates full weight hashes")
        if data.get("content_sha256") != content_digest(data):
            raise ValueError("its content does not match its digest: it was edited by hand")
        manifest = ExportManifest.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"export manifest {path} is corrupt or of another format ({exc}).", f"Re-export into {folder} with --force."
        ) from None
    return manifest


def content_digest(d: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own ``content_sha256`` field."""
    body = {k: v for k, v in d.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def manifest_sha256(folder: str | Path) -> str:
    """sha256 of an export folder's manifest file: what an engine manifest records as its source."""
    return sha256_file(Path(folder) / MANIFEST_NAME)


def verify_graph_files(folder: str | Path, manifest: ExportManifest, names: list[str] | None = None) -> None:
    """Every file that carries the named graphs' weights exists with the recorded size and full sha256."""
    folder = Path(folder)
    for name in names or list(manifest.graphs):
        if name not in manifest.graphs:
            raise ManifestMismatchError(f"export {folder} has no {name} graph.", manifest.reexport_hint(folder))
        g = manifest.graphs[name]
        files = [(folder / f, sha) for f, sha in g.weight_files()]
        missing = [str(f) for f, _ in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"export {folder} is incomplete: {', '.join(missing)} missing.", manifest.reexport_hint(folder))
        if sum(f.stat().st_size for f, _ in files) != g.bytes:
            raise CheckpointError(f"the {name} graph files in {folder} do not have the size its manifest records "
                                  "(truncated or replaced).", manifest.reexport_hint(folder))
        for f, sha in files:
            if sha256_file(f) != sha:
                raise CheckpointError(f"{f} does not match its export manifest (a file of another export, e.g. "
                                      "with another LoRA, or modified).", manifest.reexport_hint(folder))


def check_request(
    manifest: ExportManifest,
    *,
    folder: str | Path | None = None,
    model_name: str | None = None,
    model_fp: str | None = None,
    lora: dict[str, Any] | None | bool = False,
    num_views: int | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    precision: str | None = None,
) -> None:
    """Refuse an export that does not fit the request. ``lora=False`` skips the LoRA check; ``None`` means
    'no LoRA'. Every mismatch is listed in one line, with how to re-export."""
    problems = []
    if model_name is not None and manifest.model.get("name") != model_name:
        problems.append(f"model {manifest.model.get('name')!r} != {model_name!r}")
    elif model_fp is not None and manifest.model.get("fingerprint") != model_fp:
        problems.append("model weights differ from the exported ones")
    if lora is not False:
        have = manifest.lora
        if (have is None) != (lora is None):
            problems.append(f"LoRA {'none' if have is None else Path(have['path']).name} != {'none' if lora is None else Path(lora['path']).name}")
        elif have is not None and lora is not None:
            if have.get("sha256") != lora.get("sha256"):
                problems.append(f"LoRA file {Path(lora['path']).name} differs from the exported {Path(have['path']).name}")
            elif abs(float(have.get("scale", 1.0)) - float(lora.get("scale", 1.0))) > 1e-6:
                problems.append(f"LoRA scale {have.get('scale')} != {lora.get('scale')}")
    if num_views is not None and manifest.num_views != num_views:
        problems.append(f"views {manifest.num_views} != {num_views}")
    if (height is not None and manifest.height != height) or (width is not None and manifest.width != width):
        problems.append(f"resolution {manifest.width}x{manifest.height} != {width}x{height}")
    if batch is not None and batch != manifest.batch and not (manifest.dynamic_batch and batch >= 1):
        problems.append(f"batch {manifest.batch} != {batch}")
    if precision is not None and manifest.precision != precision:
        problems.append(f"precision {manifest.precision} != {precision}")
    if problems:
        where = f"export {folder}" if folder else "the export"
        raise ManifestMismatchError(f"{where} does not fit this request: {'; '.join(problems)}.", manifest.reexport_hint(folder))


def refuse_quantized_refit(manifest: ExportManifest, lora: dict[str, Any] | None, folder: str | Path | None = None) -> None:
    """A quantized (int8/fp8) UNet is calibrated for the weights it was exported with: switching its LoRA by
    refit would run the new weights through the old scales. Refuse unless ``lora`` is the exported one."""
    if not manifest.quantization:
        return
    have = manifest.lora
    same = (have is None and lora is None) or (have is not None and lora is not None
                                                and have.get("sha256") == lora.get("sha256")
                                                and abs(float(have.get("scale", 1.0)) - float(lora.get("scale", 1.0))) <= 1e-6)
    if not same:
        raise ManifestMismatchError(
            f"export {folder or ''} holds a {manifest.precision} UNet calibrated for "
            f"{'no LoRA' if have is None else Path(have['path']).name}; a quantized engine cannot be refit with another "
            "LoRA (a new LoRA needs re-calibration).",
            f"Re-export with it: mvz export --precision {manifest.precision} --lora FILE --lora-scale S --out DIR.")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
