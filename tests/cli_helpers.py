"""Running ``mvz`` in-process in a test: the exit code and everything it printed."""

from __future__ import annotations


def run_main(args: list[str], capsys) -> tuple[int, str]:
    from mvz.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    cap = capsys.readouterr()
    return code, cap.out + cap.err
