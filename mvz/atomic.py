"""Atomic writes: write to a temp file in the same folder, fsync, then rename.

A killed run never leaves a half-written file under the final name. Temp names carry the writer's process id
(``.NAME.<pid>.<random>.tmp``), so the next writer of the same name removes what a killed one (SIGKILL, power
loss: no ``finally`` ran) left behind, and never a live writer's. Files and folders get the modes a plain
``open``/``mkdir`` would (the umask decides), so a shared ``MVZ_HOME`` works for every user the umask allows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 minus the process umask."""
    return 0o666 & ~_umask()


def _new_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder: 0777 minus the process umask (mkdtemp makes 0700)."""
    return 0o777 & ~_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temp files/folders beside ``path`` left by writers of it that no longer run. Returns what went."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return removed
    for tmp in siblings:
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
            removed.append(tmp)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    with _new_parents(path) as _, _storage_errors_name(path):
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, _new_file_mode())  # mkstemp makes 0600; a plain write would honour the umask
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(contiguous, str(p), metadata=metadata))


def save_image(path: str | os.PathLike, image, text: dict[str, str] | None = None) -> Path:
    """Save a PIL image; the format is taken from the final suffix, not the temp name.

    ``text``: PNG text chunks (prompt, seed, ... as diffusers/A1111 users expect); ignored for other formats.
    """
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    extra = {}
    if text and fmt == "PNG":
        from mvz.png_metadata import pnginfo

        extra["pnginfo"] = pnginfo(text)
    return atomic_write(path, lambda p: image.save(p, format=fmt, **extra))


def _honour_umask(folder: Path) -> None:
    """Libraries that write through ``mkstemp``/``mkdtemp`` (diffusers' ``save_pretrained``, for one) leave
    0600 files and 0700 folders; give them the modes a plain write would, so a shared MVZ_HOME stays shared."""
    file_mode, dir_mode = _new_file_mode(), _new_dir_mode()
    for root, dirs, files in os.walk(folder):
        for name, mode, private in [(d, dir_mode, 0o700) for d in dirs] + [(f, file_mode, 0o600) for f in files]:
            target = Path(root) / name
            if not target.is_symlink() and target.stat().st_mode & 0o777 == private:
                os.chmod(target, mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temp name beside ``path`` and rename it into place when complete."""
    path = Path(path)
    with _new_parents(path) as _, _storage_errors_name(path):
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, _new_dir_mode())
        try:
            yield tmp
            _honour_umask(tmp)
            _replace_dir(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    backup = path.with_name(f".{path.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    os.replace(path, backup)
    os.replace(tmp, path)
    shutil.rmtree(backup)


@contextlib.contextmanager
def _new_parents(path: Path) -> Iterator[None]:
    """Create ``path``'s missing parent folders; if the write fails, remove the ones this call created (a failed
    command must not leave an empty ``models/`` behind), never a folder that existed or that is not empty."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


# Libraries that report a full disk in their own exception type (safetensors: "No space left on device (os
# error 28)") are turned into the OSError the CLI explains in one line, naming the file mvz was writing.
_STORAGE_MARKERS = {errno.ENOSPC: ("os error 28", "No space left"), errno.EDQUOT: ("os error 122", "quota exceeded")}


@contextlib.contextmanager
def _storage_errors_name(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.filename is None or Path(str(exc.filename)).name.endswith(".tmp"):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except Exception as exc:
        for code, markers in _STORAGE_MARKERS.items():
            if any(m in str(exc) for m in markers):
                raise OSError(code, os.strerror(code), str(path)) from exc
        raise


def ensure_writable_dir(
    folder: str | os.PathLike, what: str = "output folder", fix: str = "Choose a folder you can write to."
) -> Path:
    """Check that ``folder`` can be created and written; a one-line MvzError otherwise.

    Called before any long work starts, so a bad output location fails in a second, not after the run. A missing
    folder is not created (an early error must not leave an empty folder behind): its nearest existing parent
    is probed instead, and the writer creates the folder when it has something to put in it.
    """
    from mvz.errors import InputError

    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(20, "a part of the path is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=".mvz-write-check.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{what} {folder} is not writable ({exc.strerror or exc}).", fix) from None
    return folder
