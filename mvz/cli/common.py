"""Small helpers shared by the CLI commands (cheap imports only)."""

from __future__ import annotations

from mvz.errors import InputError


def parse_csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}.") from None


def split_names(items: list[str] | str) -> list[str]:
    """``--rewards a,b --rewards c`` and ``--rewards a,b,c`` both give ``[a, b, c]`` (lower case, deduplicated)."""
    items = [items] if isinstance(items, str) else items
    names = [n.strip().lower() for item in items for n in item.split(",") if n.strip()]
    return list(dict.fromkeys(names))
