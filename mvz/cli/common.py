"""Small helpers shared by the CLI commands (cheap imports only)."""

from __future__ import annotations

from mvz.errors import InputError


def parse_csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}.") from None
