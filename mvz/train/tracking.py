"""Experiment trackers through accelerate (``--log-with tensorboard|wandb|all|none``) and the sample grid image.

``metrics.jsonl`` in the run folder is the tracker-free record and is written whatever is chosen here.
TensorBoard writes to ``RUN/tensorboard/``; wandb to ``RUN/wandb/`` (``WANDB_MODE=offline`` works as usual).
"""

from __future__ import annotations

from typing import Any

LOG_WITH = ("tensorboard", "wandb", "all", "none")


def log_with_overrides(choice: str) -> list[str]:
    """``--log-with`` as the two config switches it sets."""
    from mvz.errors import InputError

    if choice not in LOG_WITH:
        raise InputError(f"--log-with {choice!r} is not known.", f"Use one of {', '.join(LOG_WITH)}.")
    tb, wb = choice in ("tensorboard", "all"), choice in ("wandb", "all")
    return [f"logging.tensorboard={str(tb).lower()}", f"logging.wandb={str(wb).lower()}"]


def _hparams(cfg) -> dict[str, Any]:
    """The flattened config as tracker hyper-parameters (scalars and strings only, as TensorBoard requires)."""
    from mvz.train.config import flatten

    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(cfg.to_dict()).items()}


class Trackers:
    """Which accelerate trackers a run uses, and images to the ones that take them."""

    def __init__(self, logging_cfg, run, purge_step: int | None = None):
        self.cfg = logging_cfg
        self.run = run
        self.purge_step = purge_step  # a resumed run drops the TensorBoard steps of the epoch it redoes

    def accelerate_trackers(self) -> list:
        """Tracker objects for ``Accelerator(log_with=...)``; they only open files on the main process."""
        from mvz.errors import ConfigError

        out = []
        if self.cfg.tensorboard:
            try:
                from accelerate.tracking import TensorBoardTracker
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (accelerate needs it at start)
            except ImportError:
                raise ConfigError("TensorBoard logging was asked for but tensorboard is not installed.",
                                  "pip install tensorboard, or pass --log-with none.") from None
            kwargs = {} if self.purge_step is None else {"purge_step": self.purge_step}
            out.append(TensorBoardTracker("tensorboard", str(self.run.path), **kwargs))
        if self.cfg.wandb:
            try:
                import wandb  # noqa: F401
                from accelerate.tracking import WandBTracker
            except ImportError:
                raise ConfigError("wandb logging was asked for but wandb is not installed.",
                                  "pip install wandb, or pass --log-with tensorboard.") from None
            out.append(WandBTracker(self.cfg.wandb_project, dir=str(self.run.path), name=self.run.path.name,
                                    resume="allow"))
        return out

    @staticmethod
    def start(accelerator, cfg) -> None:
        """``init_trackers`` with the config as hyper-parameters."""
        accelerator.init_trackers(cfg.logging.wandb_project, config=_hparams(cfg))

    @staticmethod
    def log_image(accelerator, name: str, image, step: int) -> None:
        """A PIL image to every tracker that takes images (TensorBoard, wandb)."""
        import numpy as np

        batch = np.asarray(image)[None]  # [1, H, W, 3] uint8
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: batch}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: batch}, step=step)


SAMPLE_LABEL_WIDTH = 72  # px left of each sample row, for its label


def labelled_rows(strips, labels):
    """Stack image strips as rows, each with its label (e.g. "standard" / "ZMV") written at its left."""
    from PIL import Image, ImageDraw

    grid = Image.new("RGB", (SAMPLE_LABEL_WIDTH + strips[0].width, sum(s.height for s in strips)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for strip, label in zip(strips, labels, strict=True):
        grid.paste(strip, (SAMPLE_LABEL_WIDTH, y))
        draw.multiline_text((4, y + 4), label, fill="black")
        y += strip.height
    return grid
