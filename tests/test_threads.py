"""The default CPU thread count follows the cores that are free, not the cores that exist."""

from __future__ import annotations

import os

import pytest
import torch

from eva02 import threads


@pytest.mark.parametrize(
    "cores, load, processes, expect",
    [(2, 0.1, 1, 2), (2, 1.8, 1, 1), (16, 3.4, 1, 13), (16, 0.0, 4, 4), (2, 9.0, 1, 1), (2, 0.0, 4, 1)],
)
def test_default_threads(monkeypatch, cores, load, processes, expect):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads(processes) == expect


def test_set_threads_explicit_and_default(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "default_threads", lambda processes=1: 1)
    try:
        assert threads.set_threads(None) == 1 and torch.get_num_threads() == 1
        assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
