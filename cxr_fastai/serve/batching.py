"""Dynamic batching: images from concurrent requests go through the model together.

A request's handler `await`s `Batcher.submit(item)`. One worker task per event loop takes the first
waiting item and runs it, with whatever else is waiting (up to `max_batch`), in the model executor (a
single thread: one forward pass at a time). While a pass runs, new items queue up and form the next batch,
so under load batches grow by themselves.

The wait for companions: handlers `announce()` an image when they start decoding it (the batcher then
knows it is coming) and `submit` it when decoded (or `withdraw()` it when it cannot be read). The worker
waits, at most `wait_s`, only while announced images are still being decoded: a lone request on an idle
server goes straight through, and under load a batch is not sent off a millisecond before the images that
were about to join it.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any, Callable, Sequence


class Batcher:
    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], executor: Executor, max_batch: int = 64,
                 wait_s: float = 0.005, name: str = "batcher"):
        """fn: items -> one result per item, in order (runs in `executor`)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn, self.executor, self.max_batch, self.wait_s, self.name = fn, executor, max_batch, wait_s, name
        self.batches = 0          # forward passes run
        self.items = 0            # items they held
        self.largest = 0          # the largest batch so far
        self.busy_s = 0.0         # seconds spent in fn (the model thread's work)
        self.coming = 0           # announced images still being decoded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None

    def _ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # first use, or a new event loop (a test client without its context manager runs each request
            # in a loop of its own): the old loop's queue and task are gone with it
            self._loop, self._queue, self._arrived = loop, asyncio.Queue(), asyncio.Event()
            self._task = loop.create_task(self._work(self._queue), name=self.name)
        return self._queue

    def announce(self) -> None:
        """An image is being decoded for this batcher: `submit(..., announced=True)` or `withdraw()` follows."""
        self.coming += 1

    def withdraw(self) -> None:
        """An announced image will not come (it could not be read)."""
        self.coming = max(0, self.coming - 1)
        if self._arrived is not None:
            self._arrived.set()

    async def submit(self, item: Any, announced: bool = False) -> Any:
        """The result of `fn` for this item (its exception, if the batch failed)."""
        queue = self._ensure_worker()
        if announced:
            self.coming = max(0, self.coming - 1)
        fut = asyncio.get_running_loop().create_future()
        queue.put_nowait((item, fut))
        self._arrived.set()
        return await fut

    async def _work(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        arrived = self._arrived
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while True:
                self._drain(queue, batch)
                left = deadline - loop.time()
                if len(batch) >= self.max_batch or self.coming <= 0 or left <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except asyncio.TimeoutError:
                    pass
            batch = [(item, fut) for item, fut in batch if not fut.done()]   # callers that went away
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._timed, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except Exception as e:  # the whole batch failed: every waiting request learns it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self.batches += 1
                self.items += len(batch)
                self.largest = max(self.largest, len(batch))
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    def _timed(self, items):
        t0 = time.perf_counter()
        try:
            return self.fn(items)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _drain(self, queue: asyncio.Queue, batch: list) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def aclose(self) -> None:
        """Stop the worker (server shutdown); waiting callers are cancelled."""
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            _, fut = queue.get_nowait()
            fut.cancel()

    def stats(self) -> dict[str, float]:
        return {"batches": self.batches, "items": self.items, "largest": self.largest, "busy_s": round(self.busy_s, 3)}
