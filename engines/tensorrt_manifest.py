"""The engine manifest (``<export>/engines/mvz_engines.json``): which plans were built from which export, and
whether they may serve here. Pure Python (no TensorRT import), so every check runs and is tested on a CPU.

Integrity chain: the export manifest hashes every ONNX weight file (``mvz.artifacts.manifest``); the engine manifest
records the sha256 of that export manifest file, of each plan file, and the ONNX hash each plan was built
from. A plan folder copied next to another export (another LoRA, shapes or weights), a plan swapped for
another, or an edited hash is refused with how to rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvz.artifacts.graphs import engine_profile
from mvz.artifacts.manifest import ExportManifest, content_digest, manifest_sha256, sha256_file
from mvz.errors import CheckpointError, ManifestMismatchError, ModelNotFoundError

ENGINE_MANIFEST = "mvz_engines.json"
ENGINES_SUBDIR = "engines"
ENGINE_FORMAT_VERSION = 2  # 2: plan sha256, refit mode, numeric check, content digest
REBUILD_HINT = "Rebuild them from this export: mvz export --model MODEL --out EXPORT_DIR --force (on the GPU that runs them)."


@dataclass
class EngineEntry:
    plan: str
    plan_sha256: str
    source_onnx: str
    source_sha256: str  # sha256 of the .onnx the plan was built from (export manifest's GraphEntry.sha256)
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max]
    refit: str  # "none" | "all" (REFIT) | "individual" (REFIT_INDIVIDUAL, LoRA targets only)
    build_seconds: float
    bytes: int
    check: dict[str, Any] = field(default_factory=dict)  # the numeric comparison against ONNX Runtime
    refittable_weights: int = 0

    @property
    def refittable(self) -> bool:
        return self.refit != "none"


@dataclass
class EngineManifest:
    tensorrt: str
    gpu: str
    compute_capability: str
    export_manifest_sha256: str
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    builder_optimization_level: int = 3
    workspace_bytes: int = 0
    created: str = ""
    format_version: int = ENGINE_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["content_sha256"] = content_digest(d)
        return d

    def save(self, folder: Path) -> Path:
        from mvz.atomic import write_json

        return write_json(Path(folder) / ENGINE_MANIFEST, self.to_dict())

    @classmethod
    def load(cls, folder: Path) -> EngineManifest:
        path = Path(folder) / ENGINE_MANIFEST
        if not path.is_file():
            raise ModelNotFoundError(f"no TensorRT engines in {folder} ({ENGINE_MANIFEST} missing).",
                                     "Build them with: mvz export --model MODEL --out DIR (on the GPU that runs them).")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if int(d.get("format_version", 0)) != ENGINE_FORMAT_VERSION:
                raise ValueError(f"format version {d.get('format_version')}, this mvz reads {ENGINE_FORMAT_VERSION}")
            if d.pop("content_sha256", None) != content_digest(d):
                raise ValueError("its content does not match its digest: it was edited by hand")
            d["engines"] = {k: EngineEntry(**v) for k, v in d["engines"].items()}
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"engine manifest {path} is corrupt or outdated ({exc}).", REBUILD_HINT) from None


def engine_problems(em: EngineManifest, eng_dir: Path, export_dir: Path, manifest: ExportManifest,
                    graphs: tuple[str, ...] = ("unet", "vae_decoder"), hash_plans: bool = True) -> list[str]:
    """Why these engines must not serve this export (empty: they may). Checks the export manifest's hash,
    each plan's source ONNX hash and (``hash_plans``) each plan file's full sha256."""
    problems = []
    if em.export_manifest_sha256 != manifest_sha256(export_dir):
        problems.append(f"they were built from another export than {export_dir} (another LoRA, weights or shapes)")
    for g in graphs:
        e = em.engines.get(g)
        plan = Path(eng_dir) / e.plan if e else None
        if e is None or not plan.is_file():
            problems.append(f"no {g} engine")
        elif g not in manifest.graphs or e.source_sha256 != manifest.graphs[g].sha256:
            problems.append(f"the {g} engine was built from another ONNX graph")
        elif hash_plans and sha256_file(plan) != e.plan_sha256:
            problems.append(f"{plan.name} is not the plan that was built (replaced or modified)")
    return problems


def environment_problems(em: EngineManifest, tensorrt_version: str, gpu: str, compute_capability: str) -> list[str]:
    """Why these engines cannot run with this TensorRT on this GPU (empty: they can)."""
    problems = []
    if em.tensorrt != tensorrt_version:
        problems.append(f"built with TensorRT {em.tensorrt}, this is {tensorrt_version}")
    if em.gpu != gpu or em.compute_capability != compute_capability:
        problems.append(f"built for {em.gpu} (sm {em.compute_capability}), this is {gpu} (sm {compute_capability})")
    return problems


def check_engines(em: EngineManifest, eng_dir: Path, export_dir: Path, manifest: ExportManifest,
                  environment: tuple[str, str, str] | None = None) -> None:
    """Refuse engines that do not belong to this export (or, given ``(tensorrt, gpu, sm)``, cannot run
    here), in one line with how to rebuild."""
    problems = engine_problems(em, eng_dir, export_dir, manifest)
    if environment is not None:
        problems += environment_problems(em, *environment)
    if problems:
        raise ManifestMismatchError(f"the engines in {eng_dir} do not fit: {'; '.join(problems)}.", REBUILD_HINT)


def find_engine_folder(path: Path) -> tuple[Path, Path]:
    """(export folder, engines folder) from either of them."""
    path = Path(path)
    if (path / ENGINE_MANIFEST).is_file():
        return path.parent, path
    return path, path / ENGINES_SUBDIR


def profile_shapes(manifest: ExportManifest, graph: str) -> dict[str, list[list[int]]]:
    """The engine profile of a graph from the export's recorded I/O (``mvz.artifacts.graphs.engine_profile``):
    static (min = opt = max); a dynamic batch spans 1..batch prompts."""
    shapes = {spec.name: spec.shape for spec in manifest.graphs[graph].inputs}
    return engine_profile(shapes, manifest.batch * manifest.num_views, min_rows=manifest.num_views)
