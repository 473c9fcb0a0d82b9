"""Dynamic micro-batching: requests wait in one queue and one worker turns them into model calls.

The worker takes the oldest waiting item and up to `max_batch - 1` more of the same kind ('classify',
'features', ...), waiting at most `max_wait_s` after the first for the batch to fill, then makes one
call of `run_batch(kind, payloads)` for the whole batch. That call runs in a thread of its own (the
model thread), so the event loop keeps reading and decoding requests while the model works, and the
next batch forms meanwhile: under load, batches fill from the backlog without waiting at all.

An item whose caller gives up (a timed-out request cancels its future) leaves the queue at once, and a
result that arrives for one already in the model is thrown away. The queue itself is not bounded here: the
server admits a bounded number of requests (`ServeSettings.max_queue`), which bounds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

RunBatch = Callable[[str, list[Any]], Sequence[Any]]
OnBatch = Callable[[str, int, float], None]  # (kind, batch size, seconds of the model call)


@dataclass(eq=False)  # compared by identity: removing one must not compare payloads
class _Item:
    kind: str
    payload: Any
    future: asyncio.Future


class Closed(RuntimeError):
    """The batcher is closing and takes no new items."""


class Batcher:
    """One queue, one worker task, one model thread; `submit` returns a future of the item's result."""

    def __init__(
        self, run_batch: RunBatch, *, max_batch: int, max_wait_s: float, on_batch: OnBatch | None = None
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be 1 or more, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be 0 or more, got {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        # One thread: the model is called by one batch at a time, and torch uses its own threads inside.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eva02-model")
        self._items: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not those in the model call now)."""
        return len(self._items)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is None:
            self._wake = asyncio.Event()  # on this loop (an app may be built before its loop runs)
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="eva02-batcher")

    def submit(self, kind: str, payload: Any) -> asyncio.Future:
        """Queue one item; the future gets its result (or the exception of its batch's model call)."""
        if self._closing:
            raise Closed("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        item = _Item(kind, payload, future)
        self._items.append(item)
        future.add_done_callback(lambda f: self._forget(item) if f.cancelled() else None)
        self._wake.set()
        return future

    def _forget(self, item: _Item) -> None:
        """A caller gave up: its item leaves the queue at once, so timed-out requests hold no memory
        while the model is busy (and are never computed)."""
        try:
            self._items.remove(item)
        except ValueError:  # already taken into a batch
            pass

    async def close(self) -> None:
        """Take no new items, finish every queued one, then stop the worker and the model thread."""
        self._closing = True
        self._wake.set()
        if self._worker is not None:
            await self._worker
        self.executor.shutdown(wait=True)

    # ----------------------------------------------------------------------------------- worker
    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            await self._run(batch)

    async def _collect(self) -> list[_Item] | None:
        """The next batch: the oldest item's kind, up to max_batch items, within max_wait_s of taking
        the first. None once closing and nothing is left."""
        while True:
            if self._items:
                break
            if self._closing:
                return None
            self._wake.clear()
            await self._wake.wait()
        loop = asyncio.get_running_loop()
        kind = self._items[0].kind
        batch = self._take(kind, self.max_batch)
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch and not self._closing:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._wake.clear()  # no await since the last take: no submit can be missed
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                pass
            batch += self._take(kind, self.max_batch - len(batch))
        return batch

    def _take(self, kind: str, n: int) -> list[_Item]:
        """Remove and return up to n live items of `kind`, oldest first; others keep their order."""
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        while self._items:
            item = self._items.popleft()
            if item.future.cancelled():
                continue
            if item.kind == kind and len(taken) < n:
                taken.append(item)
            else:
                kept.append(item)
        self._items = kept
        return taken

    async def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.cancelled()]
        if not live:
            return
        kind = live[0].kind
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_batch, kind, [item.payload for item in live]
            )
            if len(results) != len(live):
                raise RuntimeError(f"the model call returned {len(results)} results for {len(live)} inputs")
        except Exception as e:  # every caller of the batch gets the error, the worker goes on
            for item in live:
                if not item.future.done():
                    item.future.set_exception(e)
        else:
            for item, result in zip(live, results, strict=True):
                if not item.future.done():  # its caller may have timed out meanwhile
                    item.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(kind, len(live), time.perf_counter() - start)
