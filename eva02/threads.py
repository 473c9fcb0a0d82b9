"""How many CPU threads a command gives torch when the user does not say.

torch's default is one thread per core, which is right on an idle machine and badly wrong on a busy one:
its OpenMP workers spin waiting for cores that other processes hold. Measured on a 2-core machine with
the other core busy (load average 1.8), EVA-02-Ti at 224 px, batch 8: 1 thread 0.42 s per batch,
torch's default (2 threads) 0.95 s. On an idle machine 2 threads are about 1.8x faster than one. So the
default is the cores this process may use minus those the 1-minute load average says are taken, at
least one (split between the processes of a torchrun job on this node).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(processes: int = 1) -> int:
    """Threads per process for `processes` processes sharing this node, from the cores free right now."""
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):  # no load average on this platform: trust the core count
        busy = 0
    return max(1, (cores - busy) // max(1, processes))


def set_threads(threads: int | None, processes: int = 1) -> int:
    """Give torch `threads` CPU threads (None or 0: `default_threads`); returns the number set."""
    import torch

    n = threads or default_threads(processes)
    torch.set_num_threads(n)
    return n
