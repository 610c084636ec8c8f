"""The run folder: resolved config, metrics, TensorBoard logs, sample grids and per-epoch checkpoints.

::

    RUN/
      run.json                  marker + provenance (mvz version, config fingerprint, world size)
      config.yaml               the resolved config
      metrics.jsonl             one JSON object per iteration
      tensorboard/              TensorBoard event files (``--log-with tensorboard``)
      samples/epoch_K.png       standard vs ZMV views of fixed prompts
      epoch_K/                  ``accelerator.save_state`` plus the LoRA in the upstream layout:
        mvczigal_lcm_sdxl_lora.safetensors   upstream file name and PEFT layout (fp32), by a save-state hook
        optimizer.bin           optimizer (+ scaler.pt under fp16), written by accelerate
        random_states_R.pkl     each process's RNG states and accelerate's micro-step counter
        custom_checkpoint_0.pkl the registered training progress: lambda, tau, epoch, step, world size
        state.json              the same counters, human-readable (written last)
      report/                   ``mvz train report RUN``: curves (PNG) and report.md

Every file is written atomically and an ``epoch_K`` folder appears only when complete, so a kill at any
moment loses at most the current epoch and never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mvz.atomic import atomic_dir, write_json, write_text
from mvz.errors import CheckpointError, ConfigError, InputError
from mvz.models.lora import LORA_FILENAME
from mvz.train.config import TrainConfig, config_from_yaml_text, flatten

RUN_MARKER = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first object registered for checkpointing
STATE_JSON = "state.json"
RUN_FORMAT = 1
# keys that may change when a run is resumed (everything else must match the run's config)
RESUMABLE_CHANGES = ("training.num_epochs", "training.lr", "training.save_interval")
EPOCH_RE = re.compile(r"^epoch_(\d+)$")


@dataclass
class Checkpoint:
    epoch: int
    path: Path

    @property
    def lora(self) -> Path:
        return self.path / LORA_FILENAME

    def unreadable(self, exc: BaseException) -> CheckpointError:
        """A truncated or corrupt checkpoint: one line naming the folder to delete."""
        before = f"resume from epoch_{self.epoch - 1}" if self.epoch > 0 else "start the run again"
        return CheckpointError(
            f"training state in {self.path} is truncated or unreadable ({type(exc).__name__}).",
            f"Delete the folder {self.path} to {before} with the same --resume command.")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- paths ------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def sample_file(self, epoch: int) -> Path:
        return self.path / "samples" / f"epoch_{epoch}.png"

    def epoch_dir(self, epoch: int) -> Path:
        return self.path / f"epoch_{epoch}"

    # ---- create / open ----------------------------------------------------------------------------
    def create(self, cfg: TrainConfig, world_size: int) -> None:
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            hint = f"Continue it with --resume {self.path}" if (self.path / RUN_MARKER).is_file() else "Choose another --run-dir"
            raise InputError(f"run folder {self.path} already exists and is not empty.", f"{hint}, or pick a new --run-dir.")
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config_file, cfg.to_yaml())
        write_json(self.path / RUN_MARKER, self._marker(cfg, world_size))

    def _marker(self, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
        import mvz

        return {
            "format": RUN_FORMAT,
            "producer": "mvz train",
            "mvz_version": getattr(mvz, "__version__", "unknown"),
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "preset": cfg.preset,
            "config_fingerprint": cfg.fingerprint(ignore=RESUMABLE_CHANGES),
            "config": flatten(cfg.to_dict()),  # as trained: a hand edit of config.yaml is caught on resume
            "world_size": world_size,
        }

    def read_marker(self) -> dict[str, Any]:
        marker = self.path / RUN_MARKER
        if not self.path.is_dir() or not marker.is_file() or not self.config_file.is_file():
            raise InputError(f"{self.path} is not an mvz training run (no {RUN_MARKER} / {CONFIG_FILE}).",
                             "Pass the folder that `mvz train` created (the --run-dir of the run).")
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"{marker} is unreadable; {self.path} is not a usable run.") from None
        if not isinstance(data, dict) or data.get("producer") != "mvz train":
            raise InputError(f"{self.path} is not an mvz training run ({RUN_MARKER} was not written by mvz train).")
        return data

    def saved_config(self) -> TrainConfig:
        self.read_marker()
        return config_from_yaml_text(self.config_file.read_text(encoding="utf-8"), str(self.config_file))

    def check_resume(self, cfg: TrainConfig) -> None:
        """``cfg`` may differ from the run's config only in :data:`RESUMABLE_CHANGES`."""
        saved = flatten(self.saved_config().to_dict())
        trained = self.read_marker().get("config")
        if isinstance(trained, dict):
            key = _first_fixed_change(trained, saved)
            if key is not None:
                raise ConfigError(
                    f"cannot resume {self.path}: {self.config_file} was edited ({key} is {saved.get(key)!r} there; "
                    f"the run was trained with {trained.get(key)!r}).",
                    f"Put it back, or start a new run; only {', '.join(RESUMABLE_CHANGES)} and logging.* may change "
                    "on resume (pass them with --set).")
        new = flatten(cfg.to_dict())
        key = _first_fixed_change(saved, new)
        if key is not None:
            raise ConfigError(
                f"cannot resume {self.path}: it was trained with {key}={saved.get(key)!r}, not {new.get(key)!r}.",
                f"Resume with the run's own config (drop --preset/--config), or start a new run; only "
                f"{', '.join(RESUMABLE_CHANGES)} and logging.* may change on resume.",
            )

    def update_config(self, cfg: TrainConfig) -> None:
        write_text(self.config_file, cfg.to_yaml())

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        out = []
        if not self.path.is_dir():
            return out
        for p in self.path.iterdir():
            m = EPOCH_RE.match(p.name)
            if m and p.is_dir() and (p / STATE_JSON).is_file() and (p / LORA_FILENAME).is_file():
                out.append(Checkpoint(int(m.group(1)), p))
        return sorted(out, key=lambda c: c.epoch)

    def latest_checkpoint(self) -> Checkpoint | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def save_checkpoint(self, epoch: int, write_state, summary: dict[str, Any]) -> Path:
        """``write_state(folder)`` fills a temp folder (``accelerator.save_state``); ``state.json`` is written
        last and the folder renamed into place, so ``epoch_K`` exists only when complete."""
        target = self.epoch_dir(epoch)
        with atomic_dir(target) as tmp:
            write_state(tmp)
            (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        return target

    # ---- metrics ----------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        out = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
        return out

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop records of epochs after ``last_epoch`` (the interrupted epoch that resume redoes)."""
        keep = [r for r in self.read_metrics() if int(r.get("epoch", -1)) <= last_epoch]
        write_text(self.metrics_file, "".join(json.dumps(r, default=float) + "\n" for r in keep))


def _first_fixed_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key outside :data:`RESUMABLE_CHANGES` and ``logging.*`` whose value differs, or None."""
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or key.startswith("logging."):
            continue
        if old.get(key) != new.get(key):
            return key
    return None
