"""Strict state-dict loading, the one way every adapter, LoRA and reward checkpoint is loaded: a missing,
unexpected or wrong-shaped key is an error naming the keys (:func:`mvz.errors.describe_key_mismatch`),
never a silent partial load."""

from __future__ import annotations

from collections.abc import Mapping

from mvz.errors import CheckpointError, describe_key_mismatch

DEFAULT_HINT = "Is it the right model's checkpoint?"


def check_state(found: Mapping, expected: Mapping, what: str, hint: str = DEFAULT_HINT, noun: str = "keys") -> None:
    """Refuse ``found`` (key -> tensor) unless it has exactly the keys and shapes of ``expected``, in one
    line: ``{what} does not fit: 2 missing keys (...)``."""
    problem = describe_key_mismatch(dict(found), dict(expected), noun=noun)
    if problem:
        raise CheckpointError(f"{what} does not fit: {problem}.", hint)


def load_strict(module, state: Mapping, what: str, hint: str = DEFAULT_HINT) -> None:
    """Check ``state`` against ``module``'s own state dict, then load it (``strict=True``)."""
    check_state(state, module.state_dict(), what, hint)
    module.load_state_dict(dict(state), strict=True)
