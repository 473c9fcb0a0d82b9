"""Settings for every test process.

The default run spreads the tests over one pytest-xdist worker per core (`-n auto` in pyproject.toml).
Each worker then gives torch its share of the cores, so the workers' thread pools do not fight over
them (torch would start one thread per core in every worker).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        from eva02.threads import usable_cores

        torch.set_num_threads(max(1, usable_cores() // workers))


@pytest.fixture
def one_thread():
    """One torch thread for the test (then the number before): for tiny tensors, and on a busy machine,
    where a second OpenMP worker spins waiting for a core (eva02/threads.py). Modules take it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The modules with the longest tests run first (each module kept whole, so module fixtures are made once):
# with xdist's worksteal the short tests queued behind them then even out the workers' ends, instead of a long
# test starting last on one worker while the other waits.
LONGEST_FIRST = (
    "test_det_learning.py",
    "test_engine_dist.py",
    "test_seg_learning.py",
    "test_explain_checks.py",
    "test_export.py",
    "test_engine_digits.py",
    "test_serve.py",
    "test_serve_page.py",
    "test_engine_resume.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other order is kept
