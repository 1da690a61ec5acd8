"""Fixtures shared by the recovery-training tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: faster for tiny tensors, and on a shared 2-core machine far faster for any size
    (two threads wait on each other whenever one is descheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
