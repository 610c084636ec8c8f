"""One rank of a CPU (gloo) training run started by ``torch.distributed.run``, for ``test_distributed.py``.

It runs the real Trainer on the tiny preset and writes what the test checks to ``<out>/rank<R>.json``:
per iteration the gathered rewards, the local target rows, λ and τ; every RunDir write this rank made; and
the error that stopped it, if any. ``--scenario``: ``train`` (plain run), ``cut`` (killed in epoch 1),
``resume`` (continues a cut run), ``nan_loss`` (rank 1's loss turns NaN in epoch 1).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mvz.train.config import load_config
from mvz.train.run import RunDir
from mvz.train.trainer import Trainer

# the fixed part of every distributed test run: brightness rewards, 2 sampling steps, 1 prompt per rank
OVERRIDES = [
    "reward.reward_fn=brightness", "reward.mv_reward_fn=brightness", "reward.preset=null",
    "logging.tensorboard=false", "logging.sample_grid=false", "training.num_inference_steps=2",
    "training.sample_batch_size_per_gpu=1", "training.batches_per_epoch=1", "training.num_epochs=2",
    "training.gradient_accumulation_steps=2", "training.lr=1e-2",
]


def _record_writes(log: list) -> None:
    """Every RunDir method that writes, logged (for "only rank 0 writes checkpoints and logs")."""
    for name in ("create", "update_config", "save_checkpoint", "append_metrics", "truncate_metrics"):
        real = getattr(RunDir, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            log.append(_name)
            return _real(self, *args, **kwargs)

        setattr(RunDir, name, spy)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", default="train", choices=["train", "cut", "resume", "nan_loss"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rec: dict = {"rank": rank, "iterations": [], "writes": [], "error": None}
    _record_writes(rec["writes"])

    def kill(info):
        if args.scenario == "cut" and info["epoch"] == 1 and info["micro"] == 1:
            Path(args.out, f"rank{rank}.json").write_text(json.dumps(rec))
            os._exit(0)  # a hard stop: no cleanup, no finally blocks

    cfg = load_config("tiny", overrides=OVERRIDES)
    tr = Trainer(cfg, args.run_dir, resume=args.scenario == "resume", device="cpu", echo=lambda m: None,
                 hooks={"micro_step": kill})
    tr.setup()
    rec["world_size"] = tr.accelerator.num_processes
    real_gather, real_train_on, real_micro = tr._gather, tr.train_on, tr.micro_loss
    current: dict = {}

    def gather_spy(x):
        out = real_gather(x)
        current.setdefault("gathered", []).append(out.tolist())
        return out

    def train_on_spy(roll, target, rng, epoch, it):
        current["target"] = target.cpu().tolist()
        current["epoch"] = epoch
        return real_train_on(roll, target, rng, epoch, it)

    def micro_spy(roll, target, p, j):
        out = real_micro(roll, target, p, j)
        if args.scenario == "nan_loss" and rank == 1 and current.get("epoch") == 1:
            out.loss = out.loss * float("nan")
        return out

    tr._gather, tr.train_on, tr.micro_loss = gather_spy, train_on_spy, micro_spy
    real_iteration = tr.iteration

    def iteration_spy(epoch, it):
        current.clear()
        metrics = real_iteration(epoch, it)
        rec["iterations"].append({"epoch": epoch, "it": it, "gathered": current["gathered"], "target": current["target"],
                                  "lambda": tr.lagrangian.lam, "tau": tr.lagrangian.tau, "loss": metrics["loss"]})
        return metrics

    tr.iteration = iteration_spy
    try:
        tr.train()
    except Exception as exc:  # noqa: BLE001  (the test reads the error of every rank)
        rec["error"] = {"type": type(exc).__name__, "message": str(exc)}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main()
