"""Finding reward checkpoints on disk (offline first) and reading them safely.

Order for every file: an explicit path (a file, or a folder holding it), then ``$MVZ_HOME/rewards/<name>/``,
then any extra folder the reward knows (e.g. ``~/.cache/hpsv2``), then the Hugging Face cache (never the
network: ``try_to_load_from_cache``). A miss raises :class:`ModelNotFoundError` naming the file, every
place looked, and where the file comes from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mvz.errors import CheckpointError, ModelNotFoundError
from mvz.paths import rewards_dir


def hf_cached_file(repo_id: str, filename: str) -> Path | None:
    """Path of ``filename`` from ``repo_id`` in the local HF cache, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:
        return None
    if isinstance(hit, str) and Path(hit).is_file():
        return Path(hit)
    return None


def find_file(
    reward: str,
    names: Sequence[str],
    explicit: str | os.PathLike | None = None,
    extra_dirs: Sequence[Path] = (),
    hf: Sequence[tuple[str, str]] = (),
    source: str = "",
) -> Path:
    """Locate one of ``names`` (first is canonical) for ``reward``; see the module docstring for the order."""
    looked: list[str] = []
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for n in names:
                if (p / n).is_file():
                    return p / n
            looked.append(str(p))
        else:
            raise ModelNotFoundError(
                f"{reward}: checkpoint path {p} does not exist.",
                f"Pass the {names[0]} file (or its folder); it comes from {source}." if source else None,
            )
    else:
        for d in [rewards_dir() / reward, *extra_dirs]:
            for n in names:
                if (d / n).is_file():
                    return d / n
            looked.append(str(d))
        for repo, fname in hf:
            hit = hf_cached_file(repo, fname)
            if hit is not None:
                return hit
            looked.append(f"HF cache {repo}/{fname}")
    raise ModelNotFoundError(
        f"{reward}: {names[0]} not found (looked in: {'; '.join(looked)}).",
        (f"It comes from {source}; put it in {rewards_dir() / reward}/ or pass its path, "
         f"or use the tiny preset (preset='tiny', --preset tiny) for a test run."),
    )


def find_folder(
    reward: str,
    marker: str,
    what: str,
    explicit: str | os.PathLike | None = None,
    local_dirs: Sequence[Path] = (),
    hf: Sequence[str] = (),
    source: str = "",
) -> Path:
    """Locate a folder holding ``marker`` (e.g. ``config.json`` or ``vocab.json``)."""
    looked: list[str] = []
    candidates = [Path(explicit).expanduser()] if explicit is not None else list(local_dirs)
    for d in candidates:
        if (d / marker).is_file():
            return d
        looked.append(str(d))
    if explicit is None:
        for repo in hf:
            hit = hf_cached_file(repo, marker)
            if hit is not None:
                return hit.parent
            looked.append(f"HF cache {repo}")
    raise ModelNotFoundError(
        f"{reward}: {what} ({marker}) not found (looked in: {'; '.join(looked)}).",
        f"It comes from {source}; download it once with network access or use the tiny preset."
        if source else "Use the tiny preset for a test run.",
    )


def load_torch_state(path: Path, reward: str) -> dict:
    """``torch.load`` a checkpoint on CPU with ``weights_only=True`` (no arbitrary unpickling).

    Set ``MVZ_TRUST_CHECKPOINTS=1`` to allow full unpickling of a file you trust whose pickle holds
    non-tensor objects.
    """
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if os.environ.get("MVZ_TRUST_CHECKPOINTS") == "1":
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise CheckpointError(f"{reward}: cannot read {path}: {exc2}.") from None
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{reward}: cannot read {path} as a torch checkpoint ({first[:160]}).",
                "Check the file is complete; if it is a trusted pickle with extra objects, set MVZ_TRUST_CHECKPOINTS=1.",
            ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{reward}: {path} holds a {type(obj).__name__}, not a state dict.")
    return obj


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """Drop a DataParallel ``module.`` prefix when every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state
