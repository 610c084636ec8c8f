"""Shared fixtures. Tests never touch the network; the tiny preset builds its own files."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# One MVZ_HOME for the whole session (the tiny model is written once and reused across runs).
os.environ.setdefault("MVZ_HOME", str(Path(tempfile.gettempdir()) / "mvz-test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is available here")
    skip_trt = pytest.mark.skip(
        reason="needs TensorRT and an NVIDIA GPU" + ("" if has_trt else " (tensorrt is not installed)")
    )
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset, loaded once (fp32, CPU). Tests must not modify it; use ``fresh_tiny_model``."""
    from mvz.models.loading import load_model

    return load_model("tiny", device="cpu", dtype="fp32")


@pytest.fixture
def fresh_tiny_model():
    from mvz.models.loading import load_model

    return load_model("tiny", device="cpu", dtype="fp32")
