"""The ``mvz`` command line: generate, export, train, bench, score, info.

Thin by design: each command lives in ``mvz/cli/<name>.py`` (parse, call, print) and imports
torch and the heavy modules inside its function, so ``mvz --help`` answers without importing torch.
User errors (``MvzError``) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

COMMAND_MODULES = ("generate", "export", "train", "bench", "score", "info")
COMMAND_MODULES += ("serve",)  # issue 14

app = typer.Typer(
    name="mvz",
    help="Few-step text-to-multiview diffusion: train (MVC-ZigAL), export (ONNX/TensorRT), generate, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)



@app.callback()
def _root() -> None:
    """Few-step text-to-multiview diffusion: train (MVC-ZigAL), export (ONNX/TensorRT), generate, bench."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"mvz.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command not built yet must not break the others
        if exc.name != f"mvz.cli.{_name}":
            raise
        continue
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    from mvz.errors import MvzError

    try:
        app(args=argv, standalone_mode=False)
    except MvzError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        click_exc, abort = _click_exception_types()
        if isinstance(exc, click_exc):
            exc.show()
            sys.exit(exc.exit_code if isinstance(getattr(exc, "exit_code", None), int) else 2)
        if isinstance(exc, abort):
            sys.exit(1)
        raise


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Typer >= 0.29 vendors click as ``typer._click``; older ones use ``click`` itself. Catch both."""
    click_exc: list[type] = []
    abort: list[type] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        click_exc.append(m.ClickException)
        if hasattr(m, "Abort"):
            abort.append(m.Abort)
    return tuple(click_exc), tuple(abort)
