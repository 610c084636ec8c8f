"""The MVC-ZigAL training loop (``mvczigal.md`` §5-§8) and its baselines, on accelerate's own machinery.

Each iteration, on every process, reads top to bottom in :meth:`Trainer.iteration`:

SAMPLING
    roll out ``num_sample_iters × sample_batch_size_per_gpu`` prompts: a standard trajectory and its partner
    (ZMV from the same x_T, or a second standard one for MV-RDL; none for MV-PG), score them; gather the
    rewards across processes (NaN/inf stops the run); update τ then λ once; global z-score advantages pooled
    over both trajectories give the per-view target Δ.
TRAINING
    prompts in a random order, for each prompt all trained timesteps in a random permutation shared by its
    views and both trajectories; one micro-step = one prompt pair × one timestep under
    ``accelerator.accumulate`` (which skips DDP's all-reduce between updates); ``accelerator.backward``
    divides by ``gradient_accumulation_steps``; when ``accelerator.sync_gradients``: the NaN check, clipping
    and the optimiser step.

Checkpoints are ``accelerator.save_state`` folders (optimizer, scaler, RNG, the registered
:class:`TrainingProgress`); the LoRA goes through save/load-state hooks in the upstream file layout.
All randomness of an iteration (prompts, seeds, orders, permutations) is a pure function of
(seed, process index, epoch, iteration), so ``--resume`` continues exactly.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mvz.errors import ConfigError, TrainingDivergedError
from mvz.models.lora import LORA_FILENAME
from mvz.train.advantages import LagrangianState, delta_target, pooled_advantages, single_advantages
from mvz.train.config import TrainConfig
from mvz.train.loss import clipped_regression_loss, ppo_clipped_loss
from mvz.train.rollout import TRAJECTORY_LABELS, Rollout, cat_conditioning, collect, concat_rollouts
from mvz.train.run import RESUMABLE_CHANGES, RunDir
from mvz.train.tracking import Trackers

Hook = Callable[[dict[str, int]], None]
UNFOLDED_B_FILE = "lora_b_unfolded.safetensors"  # the trained B when lora_alpha != rank (the LoRA file folds it)


def iteration_rng(seed: int, rank: int, epoch: int, iteration: int) -> random.Random:
    """The iteration's RNG (string seeds go through SHA-512: stable across processes and Python runs)."""
    return random.Random(f"mvz-train/{seed}/{rank}/{epoch}/{iteration}")


def runtime_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, frozen-weight dtype). The CPU runs everything in fp32."""
    if device.type != "cuda":
        return "no", torch.float32
    from mvz.devices import resolve_dtype

    mp = cfg.training.mixed_precision
    return mp, resolve_dtype("fp32" if mp == "no" else mp, device)


class TrainingProgress:
    """What a checkpoint must restore beyond accelerate's own state; ``register_for_checkpointing``'d."""

    def __init__(self, lagrangian: LagrangianState, fingerprint: str):
        self.lagrangian = lagrangian
        self.fingerprint = fingerprint
        self.epoch = -1  # the last finished epoch
        self.global_step = 0
        self.world_size = 1

    def state_dict(self) -> dict[str, Any]:
        return {"lagrangian": self.lagrangian.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
                "world_size": self.world_size, "config_fingerprint": self.fingerprint}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.lagrangian.load_state_dict(d["lagrangian"])
        self.epoch, self.global_step, self.world_size = int(d["epoch"]), int(d["global_step"]), int(d["world_size"])


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
        self.progress = TrainingProgress(self.lagrangian, cfg.fingerprint(ignore=RESUMABLE_CHANGES))
        self.start_epoch = 0
        self.last_metrics: dict[str, Any] = {}

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    # ---- setup ------------------------------------------------------------------------------------
    def echo(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            self.echo_fn(msg)

    def setup(self) -> Trainer:
        """Everything that can fail on user input fails here, before any sampling."""
        from mvz.train.prompts import load_prompt_set
        from mvz.train.rewards import load_training_rewards

        checkpoint = None
        if self.resume:  # run folder checks first (cheap)
            self.run.read_marker()
            self.run.check_resume(self.cfg)
            checkpoint = self.run.latest_checkpoint()
        self.prompts = load_prompt_set(self.cfg.prompts.prompt_set)
        self._build_accelerator(purge_step=(checkpoint.epoch + 1 if checkpoint else 0) * self.cfg.training.batches_per_epoch
                                if self.resume else None)
        # rewards before the model and before any sampling: missing checkpoints and bad callables fail now
        self.rewards = load_training_rewards(self.cfg, self.device)
        self._create_or_update_run()
        self._load_model()
        self._add_lora()
        self._prepare()
        self._restore(checkpoint)
        self._build_pipelines()
        self.trackers.start(self.accelerator, self.cfg)
        return self

    def _build_accelerator(self, purge_step: int | None) -> None:
        from accelerate import Accelerator

        from mvz.devices import resolve_device

        t = self.cfg.training
        cpu = resolve_device(self.device_request).type != "cuda"  # the one resolver: refused in one line
        mp, self.model_dtype = runtime_precision(self.cfg, torch.device("cpu" if cpu else "cuda"))
        self.trackers = Trackers(self.cfg.logging, self.run, purge_step)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu, gradient_accumulation_steps=t.gradient_accumulation_steps,
                                       log_with=self.trackers.accelerate_trackers() or None)
        self.device = self.accelerator.device
        if t.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _create_or_update_run(self) -> None:
        acc = self.accelerator
        if not self.resume:
            if acc.is_main_process:
                self.run.create(self.cfg, acc.num_processes)
            acc.wait_for_everyone()
        elif acc.is_main_process:
            self.run.update_config(self.cfg)  # resumable changes (num_epochs, lr...) are recorded

    def _load_model(self) -> None:
        from mvz.models.loading import load_model
        from mvz.models.lora import has_lora

        m = self.cfg.model
        if self._model is None:
            self._model = load_model(
                m.name, base_model=m.base_model, unet_model=m.unet_model, vae_model=m.vae_model, adapter=m.adapter,
                random_weights=m.random_weights, device=self.device, dtype=self.model_dtype,
            )
        self.model = self._model
        if has_lora(self.model.unet):
            raise ConfigError("the model already carries a LoRA; training adds its own.", "Load the model without --lora.")
        res, mult = self.cfg.training.resolution, self.model.resolution_multiple
        if res % mult:
            raise ConfigError(f"training.resolution {res} is not a multiple of {mult}, which this model needs.")

    def _add_lora(self) -> None:
        from accelerate.utils import set_seed

        from mvz.models.lora import add_lora, set_lora_scale

        t = self.cfg.training
        unet = self.model.unet
        set_seed(t.seed)  # the Gaussian LoRA init is the same on every process and every run
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

    def _prepare(self) -> None:
        """Optimizer, ``prepare``, and what ``save_state``/``load_state`` carry beyond accelerate's own state."""
        t, acc = self.cfg.training, self.accelerator
        optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay,
        )
        self.unet_train, self.optimizer = acc.prepare(self.model.unet, optimizer)
        self.progress.world_size = acc.num_processes
        acc.register_for_checkpointing(self.progress)
        acc.register_save_state_pre_hook(self._save_lora_hook)
        acc.register_load_state_pre_hook(self._load_lora_hook)

    def _save_lora_hook(self, models, weights, output_dir) -> None:
        """The LoRA in the upstream file instead of accelerate's full-UNet ``model.safetensors``."""
        from mvz.atomic import save_safetensors
        from mvz.models.lora import lora_scale_of, lora_state_dict, save_lora

        t = self.cfg.training
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(models[0])
            save_lora(unet, Path(output_dir) / LORA_FILENAME)
            if lora_scale_of(t.lora_rank, t.lora_alpha) != 1.0:  # save_lora folds alpha/r into B: keep the exact B
                save_safetensors(Path(output_dir) / UNFOLDED_B_FILE,
                                 {k: v.float().cpu() for k, v in lora_state_dict(unet).items() if ".lora_B." in k})
        weights.pop()

    def _load_lora_hook(self, models, input_dir) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from mvz.models.lora import fold_alpha, lora_scale_of, read_lora_file

        t = self.cfg.training
        unet = self.accelerator.unwrap_model(models.pop())
        sd, rank, alpha = read_lora_file(Path(input_dir) / LORA_FILENAME)
        # the file applies alpha/r folded into B (scale 1); this run's LoRA applies lora_alpha/r itself
        sd = fold_alpha(sd, lora_scale_of(rank, alpha) / lora_scale_of(t.lora_rank, t.lora_alpha))
        if (Path(input_dir) / UNFOLDED_B_FILE).is_file():
            sd.update(load_file(str(Path(input_dir) / UNFOLDED_B_FILE)))  # the trained B exactly: bit-exact resume
        result = set_peft_model_state_dict(unet, {k: v.float() for k, v in sd.items()})
        bad = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora" in k]
        if bad:
            raise ConfigError(f"checkpoint {input_dir} does not fit this run's LoRA ({bad[0]}...).")

    def _restore(self, cp) -> None:
        acc = self.accelerator
        if cp is None:
            if self.resume:
                if acc.is_main_process:
                    self.run.truncate_metrics(-1)  # the interrupted epoch 0 is redone: drop its records
                self.echo(f"no finished epoch in {self.run.path}; starting it from the beginning")
            return
        saved_world = self._load_state(cp)
        for g in self.optimizer.param_groups:  # a changed training.lr applies from now on
            g["lr"] = self.cfg.training.lr
        self.start_epoch = self.progress.epoch + 1
        if saved_world != acc.num_processes:
            self.echo(f"note: the run was trained on {saved_world} processes, now {acc.num_processes}; "
                      "prompt draws differ from an uninterrupted run.")
        if acc.is_main_process:
            self.run.truncate_metrics(cp.epoch)
        self.echo(f"resumed from {cp.path} (epoch {cp.epoch} done, step {self.global_step}, "
                  f"lambda {self.lagrangian.lam:.4g}, tau {self.lagrangian.tau:.4g})")

    def _load_state(self, cp) -> int:
        """``accelerator.load_state``: LoRA (hook), optimizer, scaler, RNG, the micro-step counter, progress."""
        try:
            self.accelerator.load_state(str(cp.path))
        except ConfigError:
            raise
        except Exception as exc:  # torch reports a cut file as RuntimeError, EOFError or UnpicklingError
            raise cp.unreadable(exc) from None
        saved_world = self.progress.world_size
        self.progress.world_size = self.accelerator.num_processes
        return saved_world

    def _build_pipelines(self) -> None:
        from mvz.pipeline import MultiviewPipeline, TorchDecoder, TorchDenoiser
        from mvz.scheduler import LCMSchedule

        t = self.cfg.training
        v = t.num_views
        self.pipeline = MultiviewPipeline(self.model, TorchDenoiser(self.model, v), TorchDecoder(self.model, t.vae_batch), v)
        self.train_denoiser = TorchDenoiser(self.model, v, unet=self.unet_train)  # gradients through the (DDP) UNet
        self.schedule = LCMSchedule.create(t.num_inference_steps)
        self.alphas = self.schedule.alphas_cumprod.to(self.device)

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
            self.accelerator.end_training()
        cp = self.run.latest_checkpoint()
        return {"run_dir": str(self.run.path), "checkpoint": str(cp.path) if cp else None, "epochs": t.num_epochs,
                "global_step": self.global_step, "lambda": self.lagrangian.lam, "tau": self.lagrangian.tau,
                "metrics": self.last_metrics}

    def iteration(self, epoch: int, it: int) -> dict[str, Any]:
        acc = self.accelerator
        t0 = time.perf_counter()
        rng = iteration_rng(self.cfg.training.seed, acc.process_index, epoch, it)
        #################### SAMPLING ####################
        roll = self.rollout(rng)
        gathered = self.gather_rewards(roll, epoch, it)
        lam_before = self.update_constraint(gathered, epoch)
        target = self.targets(gathered, roll.num_prompts)
        base_kl = self.kl_to_base(roll)
        t_sample = time.perf_counter() - t0
        #################### TRAINING ####################
        t1 = time.perf_counter()
        stats = self.train_on(roll, target.to(self.device), rng, epoch, it)
        t_train = time.perf_counter() - t1
        #################### LOGGING ####################
        metrics: dict[str, Any] = {"epoch": epoch, "iteration": it, "global_step": self.global_step,
                                   "lambda": self.lagrangian.lam, "lambda_before": lam_before,
                                   "tau": self.lagrangian.tau, **stats, **self.reward_metrics(gathered)}
        metrics.update({"kl_to_base": base_kl, "delta_abs_mean": target.abs().mean().item(),
                        "prompts": roll.num_prompts * acc.num_processes, "time/sample_s": t_sample,
                        "time/train_s": t_train, "time/iteration_s": time.perf_counter() - t0})
        self.last_metrics = metrics
        return metrics

    def _hook(self, name: str, **info: int) -> None:
        if name in self.hooks:
            self.hooks[name](info)

    # ---- SAMPLING ---------------------------------------------------------------------------------
    def rollout(self, rng: random.Random) -> Rollout:
        t = self.cfg.training
        parts = []
        for _ in range(t.num_sample_iters):
            prompts = rng.choices(self.prompts, k=t.sample_batch_size_per_gpu)
            seeds = [rng.randrange(2**31) for _ in prompts]
            noise_seeds = [rng.randrange(2**31) for _ in prompts]
            parts.append(collect(self.pipeline, self.rewards.score, prompts, seeds, noise_seeds, self.cfg.pairing, t,
                                 autocast=self.accelerator.autocast))
        return concat_rollouts(parts)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x.to(self.device).contiguous()).float().cpu()

    def gather_rewards(self, roll: Rollout, epoch: int, it: int) -> list[dict[str, torch.Tensor]]:
        """Every process's rewards, per trajectory kind; a NaN/inf reward stops the run."""
        gathered = [{k: self._gather(v) for k, v in r.items()} for r in roll.rewards]
        for label, g in zip(TRAJECTORY_LABELS[self.cfg.pairing], gathered, strict=True):
            for k, v in g.items():
                if not torch.isfinite(v).all():
                    self._diverged(f"reward {k!r} of the {label} rollouts", epoch, it)
        return gathered

    def update_constraint(self, gathered: list[dict[str, torch.Tensor]], epoch: int) -> float:
        """τ then λ, once per iteration on the gathered joint rewards (τ moves every iteration; λ waits for
        ``lambda_update_delay_steps`` epochs). Returns λ before the update."""
        t = self.cfg.training
        lam_before = self.lagrangian.lam
        if self.cfg.objective == "constrained":
            m = torch.cat([g["joint"] for g in gathered]).double().mean().item()
            self.lagrangian.update(m, t.lambda_lr, t.lambda_max, t.ema_beta,
                                   update_lambda=epoch >= t.lambda_update_delay_steps)
        return lam_before

    def targets(self, gathered: list[dict[str, torch.Tensor]], p_local: int) -> torch.Tensor:
        """This process's rows of the per-view regression target Δ (or the advantages, for MV-PG)."""
        cfg, t, acc = self.cfg, self.cfg.training, self.accelerator
        rows = slice(acc.process_index * p_local, (acc.process_index + 1) * p_local)
        lam = self.lagrangian.lam
        if cfg.pairing == "single":
            return single_advantages(gathered[0]["view"], gathered[0]["joint"], cfg.objective, lam, t.ws_weight,
                                     t.adv_clip_max)[rows]
        adv = pooled_advantages(gathered[0]["view"], gathered[1]["view"], gathered[0]["joint"], gathered[1]["joint"])
        return delta_target(adv, cfg.objective, lam, t.ws_weight)[rows]

    @torch.no_grad()
    def kl_to_base(self, roll: Rollout) -> float:
        """Approximate KL of the sampling policy to the base model (LoRA off): ½·mean((logπ_old − logπ_base)²)
        over the first trajectory's views at the middle timestep (one no-grad UNet call); gathered. NaN when off."""
        from mvz.models.lora import set_lora_scale
        from mvz.pipeline import recompute_log_probs

        if not self.cfg.logging.kl_to_base:
            return float("nan")
        traj, j = roll.trajectories[0], len(self.schedule) // 2
        set_lora_scale(self.model.unet, 0.0)  # W + 0·BA = W, exactly the base weights
        try:
            with self.accelerator.autocast():
                base = recompute_log_probs(self.pipeline.denoiser, self.model_dtype, traj.states[:, j],
                                           traj.next_states[:, j], traj.timesteps[j], traj.prev_timesteps[j],
                                           roll.cond, self.alphas)
        finally:
            set_lora_scale(self.model.unet, self.cfg.training.lora_scale)
        local = 0.5 * ((traj.log_probs[:, j].to(base.device).float() - base.float()) ** 2).mean()
        return self.accelerator.gather(local.reshape(1)).float().mean().item()

    def reward_metrics(self, gathered: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Means, spreads and 95 % bands (2.5/97.5 percentiles) of every gathered reward, per trajectory kind."""
        out: dict[str, float] = {}
        labels = TRAJECTORY_LABELS[self.cfg.pairing]
        for label, g in zip(labels, gathered, strict=True):
            for k, v in g.items():
                name = "view" if k == "view" else k
                out[f"reward/{label}/{name}_mean"] = v.mean().item()
                if k in ("view", "joint"):
                    q = torch.quantile(v.flatten().double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
                    out[f"reward/{label}/{name}_std"] = v.std(unbiased=False).item()
                    out[f"reward/{label}/{name}_q025"], out[f"reward/{label}/{name}_q975"] = q.tolist()
        out["reward/view_mean"] = torch.cat([g["view"].flatten() for g in gathered]).mean().item()
        out["reward/joint_mean"] = torch.cat([g["joint"] for g in gathered]).mean().item()
        if "zmv" in labels:  # what the paper's Fig. 4 tracks: ZMV over standard
            for k in ("view", "joint"):
                out[f"zmv_advantage/{k}"] = out[f"reward/zmv/{k}_mean"] - out[f"reward/standard/{k}_mean"]
        return out

    # ---- TRAINING ---------------------------------------------------------------------------------
    def train_on(self, roll: Rollout, target: torch.Tensor, rng: random.Random, epoch: int, it: int) -> dict[str, float]:
        """Micro-steps over (prompt, timestep) under ``accelerator.accumulate``; returns the mean loss,
        approx_kl, clipfrac and grad norm."""
        t, acc = self.cfg.training, self.accelerator
        steps = self.cfg.trained_steps
        order = list(range(roll.num_prompts))
        gen = torch.Generator().manual_seed(rng.randrange(2**63))
        losses, kls, fracs, norms = [], [], [], []
        micro = 0
        # a device-side flag, read once per optimiser step (no host sync per micro-step)
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        for _ in range(t.num_inner_epochs):
            rng.shuffle(order)
            for p in order:
                perm = torch.randperm(steps, generator=gen).tolist()  # shared by the views and both trajectories
                for j in perm:
                    micro += 1
                    with acc.accumulate(self.unet_train):
                        with acc.autocast():
                            out = self.micro_loss(roll, target, p, j)
                        bad_loss = bad_loss | ~torch.isfinite(out.loss.detach())
                        acc.backward(out.loss)  # divided by gradient_accumulation_steps
                        if acc.sync_gradients:
                            norms.append(self.optimizer_step(bad_loss, epoch, it))
                    losses.append(out.loss.detach().float())
                    kls.append(out.approx_kl.float())
                    fracs.append(out.clipfrac.float())
                    self._hook("micro_step", epoch=epoch, iteration=it, micro=micro)
        local = torch.stack([torch.stack(losses).mean(), torch.stack(kls).mean(), torch.stack(fracs).mean()])
        mean = acc.gather(local.to(self.device)[None]).float().mean(dim=0).cpu()
        finite = [n for n in norms if math.isfinite(n)]
        return {"loss": mean[0].item(), "approx_kl": mean[1].item(), "clipfrac": mean[2].item(),
                "grad_norm": sum(finite) / len(finite) if finite else float("nan"), "micro_steps": micro,
                "optimizer_steps": len(norms)}

    def optimizer_step(self, bad_loss: torch.Tensor, epoch: int, it: int) -> float:
        """On ``sync_gradients``: stop on a NaN loss on any process (before the step, so NaN gradients are never
        applied), clip, step. Returns the gradient norm."""
        acc, t = self.accelerator, self.cfg.training
        flag = bad_loss.float().reshape(1)
        if acc.num_processes > 1:  # every rank keeps in step and all stop together
            flag = acc.reduce(flag, reduction="sum")
        if float(flag.item()) > 0:
            self._diverged("the loss" + (" (on at least one process)" if acc.num_processes > 1 else ""), epoch, it)
        norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
        norm_v = float(norm) if norm is not None else float("nan")
        if acc.scaler is None and not math.isfinite(norm_v):
            self._diverged("the gradient norm", epoch, it)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.optimizer.step_was_skipped:
            self.progress.global_step += 1
        return norm_v

    def micro_loss(self, roll: Rollout, target: torch.Tensor, p: int, j: int):
        """One prompt (pair) × one timestep: recompute the log-probs of the recorded actions in float32; the loss
        is ``cfg.loss_kind``'s."""
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
        if self.cfg.loss_kind == "pg":
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
        """metrics.jsonl (the tracker-free record) and every tracker, on the main process."""
        if not self.accelerator.is_main_process:
            return
        self.run.append_metrics(metrics)
        self.accelerator.log({k: v for k, v in metrics.items() if k not in ("epoch", "iteration")}, step=step)
        self.echo(
            f"epoch {metrics['epoch']} it {metrics['iteration']}: loss {metrics['loss']:.4g} "
            f"kl {metrics['approx_kl']:.3g} clipfrac {metrics['clipfrac']:.3f} lambda {metrics['lambda']:.4g} "
            f"tau {metrics['tau']:.4g} R {metrics['reward/view_mean']:.4g} R_mv {metrics['reward/joint_mean']:.4g}"
        )

    @torch.no_grad()
    def sample_grid(self, epoch: int):
        """Standard (row 1) vs ZMV (row 2) views of the fixed logging prompts: samples/epoch_K.png and every
        tracker that takes images."""
        acc = self.accelerator
        if acc.is_main_process:
            from mvz.atomic import save_image
            from mvz.models.cameras import CameraSet
            from mvz.pipeline import images_to_grid
            from mvz.train.tracking import labelled_rows

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
            grid = labelled_rows(strips, labels)
            save_image(self.run.sample_file(epoch), grid,
                       text={f"prompt {i}": p for i, p in enumerate(prompts)} | {"rows": "standard, ZMV per prompt"})
            self.trackers.log_image(acc, "samples/standard_vs_zmv", grid, (epoch + 1) * t.batches_per_epoch - 1)
        acc.wait_for_everyone()

    def save_checkpoint(self, epoch: int) -> Path | None:
        """``accelerator.save_state`` on every process into one temp folder, renamed into place by rank 0."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        self.progress.epoch = epoch

        def write_state(folder: Path | None) -> None:
            [shared] = broadcast_object_list([str(folder) if folder is not None else None])
            acc.save_state(shared)
            acc.wait_for_everyone()  # every process's RNG file is in before the rename

        path = None
        if acc.is_main_process:
            summary = {"epoch": epoch, "global_step": self.global_step, **self.lagrangian.state_dict(),
                       "lora_rank": self.cfg.training.lora_rank, "method": self.cfg.training.method,
                       "objective": self.cfg.objective,
                       "world_size": acc.num_processes, "last_metrics": self.last_metrics}
            path = self.run.save_checkpoint(epoch, write_state, summary)
            self.echo(f"saved {path}")
        else:
            write_state(None)
        acc.wait_for_everyone()
        return path

