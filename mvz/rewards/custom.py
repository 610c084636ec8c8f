"""A reward from the user's own code: ``module:callable`` or ``path/to/file.py:callable``.

The callable's contract (``docs/training.md``):

* ``fn(images, prompts)``: ``images`` float32 ``[B, V, 3, H, W]`` in [0, 1] on the training device,
  ``prompts`` a list of ``B`` strings;
* returns per-view scores ``[B, V]`` or one joint score per set ``[B]`` (a tensor, array or list), finite;
  mvz moves them to the CPU as float32. Called without gradients.

The spec is checked when it is loaded, on a small probe batch, before any sampling: a missing module, file or
attribute, a signature that cannot take ``(images, prompts)``, an output of the wrong shape, or NaN/inf, each
fail with one line naming what is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mvz.errors import InputError
from mvz.rewards.base import Reward, RewardOutput

PROBE_SETS = 2  # two sets, so a [B] output is told apart from a scalar


def is_custom_spec(name: str) -> bool:
    """``module:callable`` / ``file.py:callable`` (a registry name never has a colon)."""
    return ":" in name


def _load_callable(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise InputError(f"custom reward {spec!r} is not MODULE:CALLABLE or FILE.py:CALLABLE.",
                         "Write e.g. --reward my_rewards.py:sharpness.")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise InputError(f"custom reward file {path} does not exist.", "Pass an existing .py file.")
        name = f"mvz_custom_reward_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: any error is theirs to fix, in one line
            raise InputError(f"custom reward file {path} failed to import: {type(exc).__name__}: {exc}.") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"custom reward module {target!r} cannot be imported ({exc}).",
                             "Check PYTHONPATH, or pass a FILE.py:CALLABLE path.") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"custom reward {spec!r}: {target} has no callable {attr!r}.")
    return fn


def _check_signature(fn: Callable, spec: str) -> None:
    try:
        inspect.signature(fn).bind(torch.zeros(0), [])
    except TypeError as exc:
        raise InputError(f"custom reward {spec!r} has the wrong signature ({exc}).",
                         "It must accept (images, prompts).") from None
    except ValueError:  # builtins without a signature: let the probe call decide
        pass


def _as_scores(out, spec: str, b: int, v: int) -> torch.Tensor:
    try:
        scores = torch.as_tensor(out.detach() if isinstance(out, torch.Tensor) else out).float().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"custom reward {spec!r} returned {type(out).__name__}, not scores.",
                         f"Return a tensor [{b}, {v}] (per view) or [{b}] (per set).") from None
    if tuple(scores.shape) not in ((b, v), (b,)):
        raise InputError(f"custom reward {spec!r} returned shape {tuple(scores.shape)} for {b} sets of {v} views.",
                         f"Return [{b}, {v}] (per view) or [{b}] (per set).")
    if not torch.isfinite(scores).all():
        raise InputError(f"custom reward {spec!r} returned NaN/inf scores.", "Return finite numbers.")
    return scores


class CallableReward(Reward):
    """Wraps the user's callable in the :class:`Reward` interface; ``kind`` follows its output shape."""

    def __init__(self, spec: str, fn: Callable, kind: str):
        self.spec, self.fn, self.kind = spec, fn, kind
        self.name = spec

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        b, v = images.shape[:2]
        scores = _as_scores(self.fn(images.float(), list(prompts)), self.spec, b, v)
        if scores.ndim == 2:
            return RewardOutput(per_set=scores.mean(dim=1), per_view=scores)
        return RewardOutput(per_set=scores)


def load_custom_reward(spec: str, *, views: int = 6, size: int = 64, device=None) -> CallableReward:
    """Import ``spec`` and check it on a probe batch ``[2, views, 3, size, size]`` before it is used."""
    fn = _load_callable(spec)
    _check_signature(fn, spec)
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(PROBE_SETS, views, 3, size, size, generator=gen).to(device or "cpu")
    try:
        out = fn(probe, ["a probe prompt"] * PROBE_SETS)
    except Exception as exc:  # noqa: BLE001  (the user's code; its first failure, in one line)
        raise InputError(f"custom reward {spec!r} failed on a probe batch {tuple(probe.shape)}: "
                         f"{type(exc).__name__}: {exc}.") from None
    scores = _as_scores(out, spec, PROBE_SETS, views)
    return CallableReward(spec, fn, "per_view" if scores.ndim == 2 else "per_set")
