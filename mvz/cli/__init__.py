"""The ``mvz`` command line: generate, export, train, bench, score, info.

Thin by design: each command lives in ``mvz/cli/<name>.py`` (parse, call, print) and imports
torch and the heavy modules inside its function, so ``mvz --help`` answers without importing torch.
User errors (``MvzError``) print one line and exit 2, never a traceback; Ctrl-C exits 130 and SIGTERM 143,
each with one line saying what was kept (``mvz.cli.interrupts``).
"""

from __future__ import annotations

import importlib
import sys

import typer

COMMAND_MODULES = ("generate", "export", "train", "bench", "score", "info")
COMMAND_MODULES += ("serve",)  # issue 14
COMMAND_MODULES += ("lora",)  # issue 18

app = typer.Typer(
    name="mvz",
    help="Few-step text-to-multiview diffusion: train (MVC-ZigAL), export (ONNX/TensorRT), generate, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        import mvz

        typer.echo(f"mvz {mvz.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr (results still go to stdout). Before or after the command."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="A log line per stage, library messages on. Before or after the command."),
) -> None:
    """Few-step text-to-multiview diffusion: train (MVC-ZigAL), export (ONNX/TensorRT), generate, bench."""
    from mvz.cli import output
    from mvz.errors import InputError

    if quiet and verbose:
        raise InputError("--quiet and --verbose contradict each other.", "Pass one of them.")
    output.set_verbosity(output.QUIET if quiet else output.VERBOSE if verbose else output.NORMAL)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"mvz.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command not built yet must not break the others
        if exc.name != f"mvz.cli.{_name}":
            raise
        continue
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    from mvz.cli import interrupts, output
    from mvz.cli.failures import describe_os_error
    from mvz.cli.vocabulary import normalize
    from mvz.errors import MvzError

    argv = list(sys.argv[1:] if argv is None else argv)
    bad = _first_undecodable(argv)
    if bad is not None:
        typer.secho(f"error: argument {bad + 1} holds bytes that are not valid UTF-8. Pass UTF-8 text "
                    "(or put the prompt in a UTF-8 file and use --prompts).", fg="red", err=True)
        sys.exit(2)
    argv, notes = normalize(argv)
    output.set_verbosity(output.NORMAL)
    for note in notes:
        output.note(note)
    interrupts.install()
    try:
        code = app(args=argv, standalone_mode=False)
    except MvzError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(err.exit_code)
    except interrupts.Interrupted as stop:
        typer.secho(interrupts.message(), fg="yellow", err=True)
        sys.exit(stop.exit_code)
    except SystemExit:
        raise
    except OSError as exc:  # a folder mvz may not write (read-only MVZ_HOME, --out, --run-dir), a full disk
        line = describe_os_error(exc)
        if line is None:
            raise
        typer.secho(f"error: {line}", fg="red", err=True)
        sys.exit(2)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        click_exc, abort = _click_exception_types()
        if isinstance(exc, click_exc):
            typer.secho(f"error: {_one_line_usage_error(exc)}", fg="red", err=True)
            sys.exit(exc.exit_code if isinstance(getattr(exc, "exit_code", None), int) else 2)
        if isinstance(exc, abort):
            sys.exit(1)
        raise
    if isinstance(code, int) and code:  # typer returns, rather than raises, a non-zero exit in this mode
        if code == 130:  # a KeyboardInterrupt raised by code, not by our signal handler
            typer.secho(interrupts.message(), fg="yellow", err=True)
        sys.exit(code)


def _first_undecodable(argv: list[str]) -> int | None:
    """Index of the first argument Python decoded with surrogate escapes (invalid UTF-8 bytes), or None."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return i
    return None


def _one_line_usage_error(exc) -> str:
    """Click prints usage, a hint and the error on 3-4 lines; the house style is one line with the hint."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "mvz"
    return f"{message} (see '{path} --help' for the full usage)"


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
