"""The MVC-ZigAL training loop (``mvczigal.md`` §5-§8) and its baselines.

One iteration, on every process:

1. roll out ``num_sample_iters × sample_batch_size_per_gpu`` prompts: a standard trajectory and its partner
   (ZMV from the same x_T, or a second standard one for MV-RDL; none for MV-PG), score them;
2. gather rewards across processes; NaN/inf stops the run;
3. update τ then λ once (rank-independent arithmetic on the gathered batch);
4. global z-score advantages pooled over both trajectories; per-view target Δ;
5. train: prompts in a random order, for each prompt all trained timesteps in a random permutation shared
   by its views and both trajectories; one micro-step = one prompt pair × one timestep, with its own
   forward/backward; log-probs recomputed in float32; an optimiser step every
   ``gradient_accumulation_steps`` micro-steps (and at the end of the iteration if some are pending).

All randomness of an iteration (prompts, seeds, orders, permutations) is a pure function of
(seed, process index, epoch, iteration), so ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mvz.errors import ConfigError, TrainingDivergedError
from mvz.train.advantages import LagrangianState, delta_target, pooled_advantages, single_advantages
from mvz.train.config import TrainConfig
from mvz.train.loss import clipped_regression_loss, ppo_clipped_loss
from mvz.train.rollout import TRAJECTORY_LABELS, Rollout, cat_conditioning, collect, concat_rollouts
from mvz.train.run import RESUMABLE_CHANGES, RunDir

Hook = Callable[[dict[str, int]], None]


def iteration_rng(seed: int, rank: int, epoch: int, iteration: int) -> random.Random:
    """The iteration's RNG (string seeds go through SHA-512: stable across processes and Python runs)."""
    return random.Random(f"mvz-train/{seed}/{rank}/{epoch}/{iteration}")


def runtime_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, frozen-weight dtype). The CPU runs everything in fp32."""
    if device.type != "cuda":
        return "no", torch.float32
    mp = cfg.training.mixed_precision
    return mp, {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[mp]


def _rng_state() -> dict[str, Any]:
    """The global RNGs (the loop itself draws only from :func:`iteration_rng`; these cover anything else)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        device: str | None = None,
        model=None,
        echo: Callable[[str], None] | None = None,
        hooks: dict[str, Hook] | None = None,
    ):
        self.cfg = cfg.validate()
        self.run = RunDir(run_dir)
        self.resume = resume
        self.device_request = device
        self._model = model
        self.echo_fn = echo or print
        self.hooks = hooks or {}
        self.lagrangian = LagrangianState(cfg.training.lambda_init, cfg.training.constrain_threshold_init)
        self.start_epoch = 0
        self.global_step = 0
        self.writer = None
        self.wandb = None
        self.last_metrics: dict[str, Any] = {}

    # ---- setup ------------------------------------------------------------------------------------
    def echo(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            self.echo_fn(msg)

    def setup(self) -> Trainer:
        """Everything that can fail on user input fails here, before any sampling."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from mvz.train.prompts import load_prompt_set
        from mvz.train.rewards import load_training_rewards

        cfg, t = self.cfg, self.cfg.training
        # run folder checks first (cheap)
        checkpoint = None
        if self.resume:
            self.run.read_marker()
            self.run.check_resume(cfg)
            checkpoint = self.run.latest_checkpoint()
        self.prompts = load_prompt_set(cfg.prompts.prompt_set)

        cpu = self.device_request == "cpu" or (self.device_request in (None, "auto") and not torch.cuda.is_available())
        if not cpu and not torch.cuda.is_available():
            from mvz.errors import DeviceError

            raise DeviceError(f"device {self.device_request!r} was asked for but CUDA is not available here.", "Use --device cpu.")
        probe = torch.device("cpu" if cpu else "cuda")
        mp, self.model_dtype = runtime_precision(cfg, probe)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu)
        acc = self.accelerator
        self.device = acc.device
        if t.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # rewards before the model and before any sampling: missing checkpoints fail now
        self.rewards = load_training_rewards(cfg, self.device)

        if not self.resume:
            if acc.is_main_process:
                self.run.create(cfg, acc.num_processes)
            acc.wait_for_everyone()
        elif acc.is_main_process:
            self.run.update_config(cfg)  # resumable changes (num_epochs, lr...) are recorded

        self._load_model()
        set_seed(t.seed)  # the Gaussian LoRA init is the same on every process and every run
        self._add_lora()
        self._build_optimizer()
        self.unet_train, self.optimizer = acc.prepare(self.model.unet, self.optimizer)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        elif self.resume:
            if acc.is_main_process:
                self.run.truncate_metrics(-1)  # the interrupted epoch 0 is redone: drop its records
            self.echo(f"no finished epoch in {self.run.path}; starting it from the beginning")

        from mvz.pipeline import MultiviewPipeline, TorchDecoder, TorchDenoiser
        from mvz.scheduler import LCMSchedule

        v = t.num_views
        self.pipeline = MultiviewPipeline(self.model, TorchDenoiser(self.model, v), TorchDecoder(self.model, t.vae_batch), v)
        proxy = types.SimpleNamespace(unet=self.unet_train, mv_settings=self.model.mv_settings)
        self.train_denoiser = TorchDenoiser(proxy, v)  # gradients flow through the (DDP-wrapped) UNet
        self.schedule = LCMSchedule.create(t.num_inference_steps)
        self.alphas = self.schedule.alphas_cumprod.to(self.device)
        self._setup_logging()
        return self

    def _load_model(self) -> None:
        from mvz.models.loading import load_model

        m = self.cfg.model
        if self._model is None:
            self._model = load_model(
                m.name, base_model=m.base_model, unet_model=m.unet_model, vae_model=m.vae_model, adapter=m.adapter,
                random_weights=m.random_weights, device=self.device, dtype=self.model_dtype,
            )
        self.model = self._model
        from mvz.models.lora import has_lora

        if has_lora(self.model.unet):
            raise ConfigError("the model already carries a LoRA; training adds its own.", "Load the model without --lora.")
        res, mult = self.cfg.training.resolution, self.model.resolution_multiple
        if res % mult:
            raise ConfigError(f"training.resolution {res} is not a multiple of {mult}, which this model needs.")

    def _add_lora(self) -> None:
        from mvz.models.lora import add_lora, set_lora_scale

        t = self.cfg.training
        unet = self.model.unet
        add_lora(unet, rank=t.lora_rank, alpha=t.lora_alpha, init="gaussian")
        unet.requires_grad_(False)
        self.params = []
        for name, p in unet.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.data = p.data.float()  # LoRA in fp32 over fp16/bf16 frozen weights
                p.requires_grad_(True)
                self.params.append(p)
        if not self.params:
            raise ConfigError("no LoRA parameters were created (the UNet has none of the LoRA targets).")
        if t.lora_scale != 1.0:
            set_lora_scale(unet, t.lora_scale)
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    def _build_optimizer(self) -> None:
        t = self.cfg.training
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay,
        )

    def _load_checkpoint(self, cp) -> None:
        from peft.utils import set_peft_model_state_dict

        from mvz.models.lora import fold_alpha, lora_scale_of, read_lora_file

        t = self.cfg.training
        sd, rank, alpha = read_lora_file(cp.lora)
        state = cp.load_state()
        # the file applies alpha/r folded into B (scale 1); this run's LoRA applies lora_alpha/r itself
        sd = fold_alpha(sd, lora_scale_of(rank, alpha) / lora_scale_of(t.lora_rank, t.lora_alpha))
        sd.update(state.get("lora_b_unfolded") or {})  # the trained B exactly, so a resume stays bit-exact
        result = set_peft_model_state_dict(self.model.unet, {k: v.float() for k, v in sd.items()})
        bad = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora" in k]
        if bad:
            raise ConfigError(f"checkpoint {cp.lora} does not fit this run's LoRA ({bad[0]}...).")
        self.optimizer.load_state_dict(state["optimizer"])
        for g in self.optimizer.param_groups:  # a changed training.lr applies from now on
            g["lr"] = self.cfg.training.lr
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        if state.get("rng"):
            _set_rng_state(state["rng"])
        self.global_step = int(state["global_step"])
        self.start_epoch = int(state["epoch"]) + 1
        if state.get("world_size") != self.accelerator.num_processes:
            self.echo(f"note: the run was trained on {state.get('world_size')} processes, now {self.accelerator.num_processes}; "
                      "prompt draws differ from an uninterrupted run.")
        if self.accelerator.is_main_process:
            self.run.truncate_metrics(cp.epoch)
        self.echo(f"resumed from {cp.path} (epoch {cp.epoch} done, step {self.global_step}, "
                  f"lambda {self.lagrangian.lam:.4g}, tau {self.lagrangian.tau:.4g})")

    def _setup_logging(self) -> None:
        lg = self.cfg.logging
        if not self.accelerator.is_main_process:
            return
        if lg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.echo("note: tensorboard is not installed (pip install 'mvz[train]'); logging to metrics.jsonl only")
            else:
                purge = self.start_epoch * self.cfg.training.batches_per_epoch if self.resume else None
                self.writer = SummaryWriter(str(self.run.tensorboard_dir), purge_step=purge)
        if lg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("logging.wandb is true but wandb is not installed.", "pip install wandb, or drop it.") from None
            self.wandb = wandb.init(project=lg.wandb_project, dir=str(self.run.path), config=self.cfg.to_dict(),
                                    name=self.run.path.name, resume="allow")

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        t = self.cfg.training
        if not hasattr(self, "accelerator"):
            self.setup()
        try:
            for epoch in range(self.start_epoch, t.num_epochs):
                for it in range(t.batches_per_epoch):
                    metrics = self.iteration(epoch, it)
                    self._log(metrics, epoch * t.batches_per_epoch + it)
                self._hook("epoch_end", epoch=epoch)
                if self.cfg.logging.sample_grid:
                    self.sample_grid(epoch)
                if (epoch + 1) % t.save_interval == 0 or epoch + 1 == t.num_epochs:
                    self.save_checkpoint(epoch)
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
        cp = self.run.latest_checkpoint()
        return {"run_dir": str(self.run.path), "checkpoint": str(cp.path) if cp else None, "epochs": t.num_epochs,
                "global_step": self.global_step, "lambda": self.lagrangian.lam, "tau": self.lagrangian.tau,
                "metrics": self.last_metrics}

    def _hook(self, name: str, **info: int) -> None:
        if name in self.hooks:
            self.hooks[name](info)

    def rollout(self, rng: random.Random) -> Rollout:
        t = self.cfg.training
        parts = []
        self.pipeline.denoiser.num_views = t.num_views
        for _ in range(t.num_sample_iters):
            prompts = rng.choices(self.prompts, k=t.sample_batch_size_per_gpu)
            seeds = [rng.randrange(2**31) for _ in prompts]
            noise_seeds = [rng.randrange(2**31) for _ in prompts]
            parts.append(collect(self.pipeline, self.rewards.score, prompts, seeds, noise_seeds, self.cfg.pairing, t,
                                 autocast=self.accelerator.autocast))
        return concat_rollouts(parts)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x.to(self.device).contiguous()).float().cpu()

    def iteration(self, epoch: int, it: int) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        acc = self.accelerator
        t0 = time.perf_counter()
        rng = iteration_rng(t.seed, acc.process_index, epoch, it)
        roll = self.rollout(rng)
        t_sample = time.perf_counter() - t0
        p_local = roll.num_prompts
        labels = TRAJECTORY_LABELS[cfg.pairing]
        gathered = [{k: self._gather(v) for k, v in r.items()} for r in roll.rewards]
        for label, g in zip(labels, gathered, strict=True):
            for k, v in g.items():
                if not torch.isfinite(v).all():
                    self._diverged(f"reward {k!r} of the {label} rollouts", epoch, it)

        # constraint: once per iteration, before training, on the gathered joint rewards
        lam_before = self.lagrangian.lam
        if cfg.objective == "constrained":  # τ moves every iteration; λ waits for lambda_update_delay_steps epochs
            m = torch.cat([g["joint"] for g in gathered]).double().mean().item()
            self.lagrangian.update(m, t.lambda_lr, t.lambda_max, t.ema_beta,
                                   update_lambda=epoch >= t.lambda_update_delay_steps)
        lam = self.lagrangian.lam
        rows = slice(acc.process_index * p_local, (acc.process_index + 1) * p_local)
        if cfg.pairing == "single":
            target = single_advantages(gathered[0]["view"], gathered[0]["joint"], cfg.objective, lam, t.ws_weight,
                                       t.adv_clip_max)[rows]
        else:
            adv = pooled_advantages(gathered[0]["view"], gathered[1]["view"], gathered[0]["joint"], gathered[1]["joint"])
            target = delta_target(adv, cfg.objective, lam, t.ws_weight)[rows]

        t1 = time.perf_counter()
        stats = self.train_on(roll, target.to(self.device), rng, epoch, it)
        t_train = time.perf_counter() - t1

        metrics: dict[str, Any] = {"epoch": epoch, "iteration": it, "global_step": self.global_step,
                                   "lambda": lam, "lambda_before": lam_before, "tau": self.lagrangian.tau}
        metrics.update(stats)
        for label, g in zip(labels, gathered, strict=True):
            metrics[f"reward/{label}/view_mean"] = g["view"].mean().item()
            metrics[f"reward/{label}/view_std"] = g["view"].std(unbiased=False).item()
            for k, v in g.items():
                if k != "view":
                    metrics[f"reward/{label}/{k}_mean"] = v.mean().item()
            metrics[f"reward/{label}/joint_std"] = g["joint"].std(unbiased=False).item()
        metrics["reward/view_mean"] = torch.cat([g["view"].flatten() for g in gathered]).mean().item()
        metrics["reward/joint_mean"] = torch.cat([g["joint"] for g in gathered]).mean().item()
        metrics["delta_abs_mean"] = target.abs().mean().item()
        metrics["prompts"] = p_local * acc.num_processes
        metrics["time/sample_s"] = t_sample
        metrics["time/train_s"] = t_train
        self.last_metrics = metrics
        return metrics

    def train_on(self, roll: Rollout, target: torch.Tensor, rng: random.Random, epoch: int, it: int) -> dict[str, float]:
        """Micro-steps over (prompt, timestep); returns mean loss / approx_kl / clipfrac / grad norm."""
        t = self.cfg.training
        acc = self.accelerator
        s = len(self.schedule)
        steps = s if t.train_last_step or s == 1 else s - 1
        order = list(range(roll.num_prompts))
        gen = torch.Generator().manual_seed(rng.randrange(2**63))
        total = roll.num_prompts * steps * t.num_inner_epochs
        ga = t.gradient_accumulation_steps
        losses, kls, fracs, norms = [], [], [], []
        micro = 0
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        for _ in range(t.num_inner_epochs):
            rng.shuffle(order)
            for p in order:
                perm = torch.randperm(steps, generator=gen).tolist()  # shared by the views and both trajectories
                for j in perm:
                    micro += 1
                    sync = micro % ga == 0 or micro == total
                    ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.unet_train)
                    with ctx:
                        with acc.autocast():
                            out = self.micro_loss(roll, target, p, j)
                        # a device-side flag, read once per optimiser step (no host sync per micro-step); with
                        # several processes every rank keeps in step and all stop together at the sync below
                        bad_loss = bad_loss | ~torch.isfinite(out.loss.detach())
                        acc.backward(out.loss / ga)
                    losses.append(out.loss.detach().float())
                    kls.append(out.approx_kl.float())
                    fracs.append(out.clipfrac.float())
                    if sync:
                        flag = bad_loss.float().reshape(1)
                        if acc.num_processes > 1:
                            flag = acc.reduce(flag, reduction="sum")
                        if float(flag.item()) > 0:  # before the step: NaN gradients are never applied
                            self._diverged("the loss" + (" (on at least one process)" if acc.num_processes > 1 else ""),
                                           epoch, it)
                        norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
                        norm_v = float(norm) if norm is not None else float("nan")
                        if acc.scaler is None and not math.isfinite(norm_v):
                            self._diverged("the gradient norm", epoch, it)
                        norms.append(norm_v)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        if not getattr(self.optimizer, "step_was_skipped", False):
                            self.global_step += 1
                    self._hook("micro_step", epoch=epoch, iteration=it, micro=micro)
        local = torch.stack([torch.stack(losses).mean(), torch.stack(kls).mean(), torch.stack(fracs).mean()])
        mean = acc.gather(local.to(self.device)[None]).float().mean(dim=0).cpu()
        finite = [n for n in norms if math.isfinite(n)]
        return {"loss": mean[0].item(), "approx_kl": mean[1].item(), "clipfrac": mean[2].item(),
                "grad_norm": sum(finite) / len(finite) if finite else float("nan"), "micro_steps": micro,
                "optimizer_steps": len(norms)}

    def micro_loss(self, roll: Rollout, target: torch.Tensor, p: int, j: int):
        """One prompt (pair) × one timestep: recompute the log-probs of the recorded actions in float32."""
        from mvz.pipeline import recompute_log_probs

        t = self.cfg.training
        v = t.num_views
        rows = slice(p * v, (p + 1) * v)
        trajs = roll.trajectories
        cond = roll.cond.select(rows)
        states = torch.cat([tr.states[rows, j] for tr in trajs])
        nexts = torch.cat([tr.next_states[rows, j] for tr in trajs])
        old = torch.cat([tr.log_probs[rows, j] for tr in trajs])
        tj, tpj = trajs[0].timesteps[j], trajs[0].prev_timesteps[j]
        if t.split_pair_forward and len(trajs) > 1:  # one call per trajectory: lower peak activation memory
            logp = torch.cat([
                recompute_log_probs(self.train_denoiser, self.model_dtype, states[k * v:(k + 1) * v],
                                    nexts[k * v:(k + 1) * v], tj, tpj, cond, self.alphas)
                for k in range(len(trajs))
            ])
        else:  # all views of both trajectories in one UNet call
            logp = recompute_log_probs(self.train_denoiser, self.model_dtype, states, nexts, tj, tpj,
                                       cat_conditioning([cond] * len(trajs)), self.alphas)
        if len(trajs) == 1:
            return ppo_clipped_loss(logp, old, target[p], t.clip_range)
        return clipped_regression_loss(logp[:v], old[:v], logp[v:], old[v:], target[p], t.clip_range)

    # ---- outputs ----------------------------------------------------------------------------------
    def _diverged(self, what: str, epoch: int, it: int) -> None:
        cp = self.run.latest_checkpoint()
        keep = f"the last good checkpoint is {cp.path}" if cp else "no epoch had finished, so there is no checkpoint"
        raise TrainingDivergedError(
            f"training diverged: {what} became NaN/inf at epoch {epoch}, iteration {it}; {keep}.",
            f"Resume with `mvz train --resume {self.run.path} --set training.lr=...` (a lower learning rate), "
            "or check the reward models.",
        )

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        self.run.append_metrics(metrics)
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iteration"):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.echo(
            f"epoch {metrics['epoch']} it {metrics['iteration']}: loss {metrics['loss']:.4g} "
            f"kl {metrics['approx_kl']:.3g} clipfrac {metrics['clipfrac']:.3f} lambda {metrics['lambda']:.4g} "
            f"tau {metrics['tau']:.4g} R {metrics['reward/view_mean']:.4g} R_mv {metrics['reward/joint_mean']:.4g}"
        )

    @torch.no_grad()
    def sample_grid(self, epoch: int):
        """Standard (row 1) vs ZMV (row 2) views of the fixed logging prompts; saved as samples/epoch_K.png."""
        acc = self.accelerator
        if acc.is_main_process:

            from mvz.atomic import save_image
            from mvz.models.cameras import CameraSet
            from mvz.pipeline import images_to_grid

            t, lg = self.cfg.training, self.cfg.logging
            prompts = list(lg.sample_prompts) or self.prompts[:2]
            seeds = [lg.sample_seed + i for i in range(len(prompts))]
            kw = dict(steps=t.num_inference_steps, guidance=t.guidance_scale, cameras=CameraSet.default(t.num_views),
                      height=t.resolution, width=t.resolution, inv_guidance=t.inv_guidance_scale)
            with acc.autocast():
                std = self.pipeline.sample(prompts, seeds, **kw).images
                zmv = self.pipeline.sample(prompts, seeds, zmv=True, zmv_steps=t.zmv_steps, zmv_repeats=t.zmv_repeats, **kw).images
            strips = [images_to_grid(imgs[i]) for i in range(len(prompts)) for imgs in (std, zmv)]
            labels = [f"{kind}\nprompt {i}" for i in range(len(prompts)) for kind in ("standard", "ZMV")]
            grid = _labelled_rows(strips, labels)
            save_image(self.run.sample_file(epoch), grid,
                       text={f"prompt {i}": p for i, p in enumerate(prompts)} | {"rows": "standard, ZMV per prompt"})
            if self.writer is not None:
                import numpy as np

                arr = torch.from_numpy(np.array(grid)).permute(2, 0, 1)
                self.writer.add_image("samples/standard_vs_zmv", arr, (epoch + 1) * t.batches_per_epoch - 1)
        acc.wait_for_everyone()

    def save_checkpoint(self, epoch: int) -> Path | None:
        acc = self.accelerator
        path = None
        if acc.is_main_process:
            from mvz.models.lora import lora_scale_of, lora_state_dict, save_lora

            unet = acc.unwrap_model(self.unet_train)
            t = self.cfg.training
            unfolded = {}  # save_lora folds alpha/r into B; keep the trained B for an exact resume
            if lora_scale_of(t.lora_rank, t.lora_alpha) != 1.0:
                unfolded = {k: v.detach().float().cpu() for k, v in lora_state_dict(unet).items() if ".lora_B." in k}
            scaler = getattr(acc, "scaler", None)
            state = {
                "epoch": epoch,
                "global_step": self.global_step,
                "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "lagrangian": self.lagrangian.state_dict(),
                "rng": _rng_state(),
                "world_size": acc.num_processes,
                "config_fingerprint": self.cfg.fingerprint(ignore=RESUMABLE_CHANGES),
                "lora_b_unfolded": unfolded,
            }
            summary = {"epoch": epoch, "global_step": self.global_step, **self.lagrangian.state_dict(),
                       "lora_rank": self.cfg.training.lora_rank, "method": self.cfg.training.method,
                       "objective": self.cfg.objective, "last_metrics": self.last_metrics}
            path = self.run.save_checkpoint(epoch, lambda p: save_lora(unet, p), state, summary)
            self.echo(f"saved {path}")
        acc.wait_for_everyone()
        return path


SAMPLE_LABEL_WIDTH = 72  # px left of each sample row, for its label


def _labelled_rows(strips, labels):
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
