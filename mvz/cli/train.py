"""``mvz train``: MVC-ZigAL LoRA fine-tuning (and its baselines) from a preset or YAML config.

Multi-GPU / multi-node: ``accelerate launch -m mvz train --preset lcm_sdxl_simple ...``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    train_app = typer.Typer(no_args_is_help=False, rich_markup_mode="rich",
                            context_settings={"help_option_names": ["-h", "--help"]})
    app.add_typer(train_app, name="train")

    @train_app.command("report")
    def report(
        run: Path = typer.Argument(..., help="A run folder written by `mvz train` (finished, killed or multi-process)."),
        out: Path = typer.Option(None, "--out", "-o", help="Report folder (default RUN/report)."),
    ) -> None:
        """Draw the run's curves (PNG) and one Markdown page: rewards with 95 % bands, tau and lambda, clip
        fraction, ZMV advantage, KL to the base model, time per epoch, the last sample grid."""
        from mvz.train.report import write_report

        page = write_report(run, out)
        typer.echo(f"report: {page}")

    @train_app.callback(invoke_without_command=True)
    def train(
        ctx: typer.Context,
        preset: str = typer.Option(None, "--preset", help="Training preset: tiny, lcm_sdxl_simple, lcm_sdxl_mate3d."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML config (applied over the preset, if any)."),
        overrides: list[str] = typer.Option(None, "--set", "-s", help="Dotted override, e.g. --set training.lr=5e-5 (repeatable)."),
        prompts: str = typer.Option(None, "--prompts", help="Prompt file (one per line) or shipped set name; sets prompts.prompt_set."),
        run_dir: Path = typer.Option(None, "--run-dir", "-o", help="Run folder to create (default runs/<preset>-<time>)."),
        resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder from its last finished epoch."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (multi-GPU: use accelerate launch)."),
        random_weights: bool = typer.Option(False, "--random-weights", help="Full-size architecture without weights (timing)."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
        log_with: str = typer.Option(None, "--log-with",
                                     help="Trackers: tensorboard | wandb | all | none (default: the config's, tensorboard)."),
        reward: str = typer.Option(None, "--reward",
                                   help="Per-view reward R: a name or your MODULE:CALLABLE / FILE.py:CALLABLE (docs/training.md)."),
        mv_reward: str = typer.Option(None, "--mv-reward", help="Joint reward R_mv: a name or MODULE:CALLABLE / FILE.py:CALLABLE."),
    ) -> None:
        """Fine-tune a LoRA with MVC-ZigAL (paired standard/ZMV rollouts, constrained multiview reward).

        Writes RUN/config.yaml, metrics.jsonl, tensorboard/, samples/epoch_K.png and
        epoch_K/mvczigal_lcm_sdxl_lora.safetensors (+ accelerate's training state) each epoch.
        `mvz train report RUN` draws the run's curves. --config also takes upstream MVC-ZigAL's own YAML files.
        """
        if ctx.invoked_subcommand is not None:
            return
        import json

        from mvz.cli import output

        sets = _cli_overrides(overrides, log_with, reward, mv_reward, prompts, random_weights)
        cfg, target, notes = _resolve(preset, config, sets, resume, run_dir)
        for note in notes:  # upstream config keys that have no mvz counterpart
            output.note(note)
        if print_config:
            typer.echo(cfg.to_yaml().rstrip())
            return
        summary = _run(cfg, target, resume is not None, device)
        if json_out:
            typer.echo(json.dumps(summary, indent=2, default=float))
        else:
            typer.echo(f"done: {summary['run_dir']} (last checkpoint {summary['checkpoint']})")


def _cli_overrides(overrides, log_with, reward, mv_reward, prompts, random_weights) -> list[str]:
    """The command-line shortcuts as ``--set`` overrides (after the user's own)."""
    import json

    from mvz.errors import InputError

    sets = list(overrides or [])
    if log_with is not None:
        from mvz.train.tracking import log_with_overrides

        sets += log_with_overrides(log_with)
    for key, value in (("reward.reward_fn", reward), ("reward.mv_reward_fn", mv_reward)):
        if value is not None:
            if not value.strip():
                raise InputError(f"{key} is empty.", "Name a reward or MODULE:CALLABLE.")
            sets.append(f"{key}={json.dumps(value.strip())}")
    if prompts is not None:
        if not prompts.strip():
            raise InputError("--prompts is empty.", "Pass a prompt file with one prompt per line.")
        sets.append(f"prompts.prompt_set={json.dumps(prompts)}")
    if random_weights:
        sets.append("model.random_weights=true")
    return sets


def _resolve(preset, config, sets, resume, run_dir):
    """(config, run folder, notes): a new run's from preset/file/overrides, a resumed run's from its own."""
    import time

    from mvz.errors import InputError
    from mvz.train.config import apply_overrides, available_presets, from_dict, load_config

    notes: list[str] = []
    if resume is None:
        if not preset and not config:
            raise InputError("no training config given.",
                             f"Pass --preset ({', '.join(available_presets())}) or --config FILE.")
        cfg = load_config(preset, config, sets, notes=notes)
        target = Path(run_dir) if run_dir else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        return cfg, target, notes
    from mvz.train.run import RunDir

    rd = RunDir(resume)
    rd.read_marker()
    if preset or config:
        cfg = load_config(preset, config, sets, notes=notes)
    else:
        cfg = from_dict(apply_overrides(rd.saved_config().to_dict(), sets))
    rd.check_resume(cfg)
    if run_dir is not None and Path(run_dir).resolve() != Path(resume).resolve():
        raise InputError("--run-dir and --resume name different folders.", "Pass only --resume RUN.")
    return cfg, Path(resume), notes


def _run(cfg, target: Path, resume: bool, device: str) -> dict:
    """Train with a progress bar over the micro-steps left."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from mvz.atomic import ensure_writable_dir
    from mvz.cli import output
    from mvz.train.trainer import Trainer

    ensure_writable_dir(target, "--run-dir", fix="Pass --run-dir with a folder you can write to.")
    new_folder = not resume and not target.exists()
    t = cfg.training
    with _leftovers_guard(target, new_folder), output.progress_bar(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), console=output.console(stderr=True)) as progress:
        task = progress.add_task("setting up", total=None)

        def on_micro(info: dict) -> None:
            progress.update(task, advance=1, description=f"epoch {info['epoch']} it {info['iteration']}")

        trainer = Trainer(cfg, target, resume=resume, device=device, echo=progress.console.print,
                          hooks={"micro_step": on_micro})
        trainer.setup()
        output.log(f"run folder {target}: epochs {trainer.start_epoch}..{t.num_epochs - 1}")
        left = (t.num_epochs - trainer.start_epoch) * t.batches_per_epoch * cfg.micro_steps_per_iteration
        progress.update(task, total=left, completed=0, description=f"run {target}")
        return trainer.train()


@contextlib.contextmanager
def _leftovers_guard(target: Path, new_folder: bool):
    """An interrupted run says how to resume; a new run that fails before its first epoch leaves no folder."""
    from mvz.cli import interrupts
    from mvz.train.run import RUN_MARKER, RunDir

    try:
        yield
    except interrupts.Interrupted:
        if (target / RUN_MARKER).is_file():
            interrupts.set_outcome(f"resume with: mvz train --resume {target}")
        raise
    except Exception:  # noqa: BLE001  (any early failure: no config.yaml/run.json left behind)
        if new_folder and target.is_dir() and not RunDir(target).checkpoints():
            shutil.rmtree(target, ignore_errors=True)
        raise
