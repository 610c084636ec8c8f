"""Shared by the training tests (``test_train_*.py``): import the fixtures you need from here."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 shared cores; oversubscribed OpenMP threads make the tiny UNet ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
