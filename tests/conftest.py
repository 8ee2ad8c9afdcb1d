"""Shared fixtures. Helpers live in tests/helpers.py; the GPU skip is helpers.cuda_only / DEVICES."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny ops on a shared, oversubscribed CPU run many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
