"""Dynamic batching: concurrent requests are coalesced into one call of a synchronous batch function.

Each :meth:`DynamicBatcher.submit` puts one item on an asyncio queue and awaits its own result. One batch
forms at a time: a worker takes the first waiting item and collects more until ``max_batch_size`` items or
``max_wait_s`` after the first one, waiting only while the batch is smaller than the previous one or
requests are in progress that no worker holds (a lone request never waits). It runs the batch function in
a thread so the event loop keeps serving, while up to ``workers`` batches run at once. If a batched call
raises, an optional ``screen`` finds the items that are bad on their own (they fail with its error) and the
rest run again as one batch; what still fails is retried one by one, so only the item that is really bad
fails. With a ``group`` function, one batch holds items of one group only (one model version per model
call): an item of another group met while a batch forms is held back, in order, for the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
BatchFunction = Callable[[Sequence[Item]], Sequence[Result]]
Screen = Callable[[Item], BaseException | None]
Group = Callable[[Item], Hashable]

logger = logging.getLogger(__name__)


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    enqueued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[Item, Result]):
    """Coalesce concurrent :meth:`submit` calls into batches for ``predict`` (a sync batch function)."""

    def __init__(
        self,
        predict: BatchFunction[Item, Result],
        *,
        max_batch_size: int,
        max_wait_s: float,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
        requests_in_flight: Callable[[], int] | None = None,
        peak_in_flight: Callable[[], int] | None = None,
        screen: Screen[Item] | None = None,
        group: Group[Item] | None = None,
    ) -> None:
        self._predict = predict
        self._screen = screen
        self._group = group
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.workers = workers
        self._on_batch = on_batch
        self._requests_in_flight = requests_in_flight
        self._peak_in_flight = peak_in_flight
        self._queue: asyncio.Queue[_Pending[Item, Result]] | None = None
        self._held: deque[_Pending[Item, Result]] = deque()  # taken from the queue, of another group
        self._tasks: list[asyncio.Task[None]] = []
        self._last_batch_size = 0
        self._in_hand: list[list[_Pending[Item, Result]]] = []
        self._collecting: asyncio.Lock | None = None

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        """Start the worker tasks on the running event loop."""
        if self._tasks:
            return
        self._queue = asyncio.Queue()
        self._collecting = asyncio.Lock()  # one batch forms at a time; up to ``workers`` run at once
        self._tasks = [asyncio.create_task(self._work(), name=f"batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        """Cancel the workers; items still waiting fail with CancelledError."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while self._held:
            self._held.popleft().future.cancel()
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.cancel()

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` for the next batch and wait for its result (or its own exception)."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        return await future

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue several items (they may land in one or more batches); results in order."""
        return list(await asyncio.gather(*(self.submit(item) for item in items)))

    async def _collect(self, batch: list[_Pending[Item, Result]]) -> list[_Pending[Item, Result]]:
        """Fill ``batch`` (in place, so a cancelled worker can still settle what it holds)."""
        assert self._queue is not None
        first = self._held.popleft() if self._held else await self._queue.get()
        batch.append(first)
        key = self._group(first.item) if self._group is not None else None
        deadline = first.enqueued_at + self.max_wait_s
        while len(batch) < self._share(batch):
            item = self._take_nowait(key)
            if item is not None:
                batch.append(item)
                continue
            if not self._others_may_join(batch):
                break  # waiting would only add latency
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            item = await self._get_within(remaining)
            if item is None:
                break
            if self._group is not None and self._group(item.item) != key:
                self._held.append(item)
                continue
            batch.append(item)
        self._last_batch_size = len(batch)
        return [pending for pending in batch if not pending.future.done()]

    def _take_nowait(self, key: Hashable) -> _Pending[Item, Result] | None:
        """The oldest waiting item of group ``key`` (held back ones first), without waiting; items of other
        groups met on the way are held back for the next batch."""
        assert self._queue is not None
        if self._held:
            for index, pending in enumerate(self._held):
                if self._group is None or self._group(pending.item) == key:
                    del self._held[index]
                    return pending
        while True:
            try:
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
            if self._group is None or self._group(pending.item) == key:
                return pending
            self._held.append(pending)

    async def _get_within(self, timeout: float) -> _Pending[Item, Result] | None:
        """The next queued item within ``timeout`` seconds, else None. No item is lost when the timeout fires
        just as one arrives: ``asyncio.Queue`` hands an item over only when its getter resumes, so a getter
        cancelled in between leaves it queued and wakes the next one. No task is created per wait (this runs
        once per item while a batch fills)."""
        assert self._queue is not None
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def _share(self, batch: list[_Pending[Item, Result]]) -> int:
        """The most items ``batch`` takes: ``max_batch_size``, or, with several workers and the recent peak
        of requests in progress known, its part of those no running batch holds, spread over the workers
        not running one. Under steady load the workers then run equal batches side by side, and one batch's
        answers go out and its clients' next requests come in while the other computes. A batch short of
        its share waits for it (within the max wait): a peak is steadier than the count of the moment, which
        dips while answers go out and the next requests are not read yet."""
        if not self._spreads():
            return self.max_batch_size
        assert self._peak_in_flight is not None
        running = [held for held in self._in_hand if held and held is not batch]
        expected = self._peak_in_flight() - sum(len(held) for held in running)
        free_workers = max(1, self.workers - len(running))
        return max(1, min(self.max_batch_size, -(-expected // free_workers)))

    def _spreads(self) -> bool:
        return self._peak_in_flight is not None and self.workers > 1

    def _others_may_join(self, batch: list[_Pending[Item, Result]]) -> bool:
        """Whether waiting could fill ``batch``: requests are in progress that no worker holds yet (when the
        caller counts them; those in another worker's running batch cannot join), or, while no other batch
        runs, it is smaller than the previous one (under steady load the clients just answered send their
        next requests, so the previous size is the best guess of who comes; while another batch runs, the
        previous one may be that batch, whose clients cannot come yet)."""
        if self._spreads():
            return True  # the share (what the loop fills up to) counts who is expected
        in_flight = self._requests_in_flight
        if in_flight is not None and in_flight() > sum(len(held) for held in self._in_hand):
            return True
        others_running = any(held for held in self._in_hand if held is not batch)
        return not others_running and len(batch) < self._last_batch_size

    async def _work(self) -> None:
        """Collect and run batches until stopped; no error (nor stray cancellation) ends the loop."""
        while True:
            batch: list[_Pending[Item, Result]] = []
            self._in_hand.append(batch)
            try:
                assert self._collecting is not None
                async with self._collecting:
                    ready = await self._collect(batch)
                if not ready:
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(ready))
                await self._run(ready)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.cancel()
                    raise
                logger.warning("batch worker interrupted; queueing its %d items again", len(batch))
                for pending in batch:
                    if not pending.future.done() and self._queue is not None:
                        self._queue.put_nowait(pending)
            except Exception as error:
                logger.exception("batch worker failed; its items fail, the worker goes on")
                for pending in batch:
                    _settle_error(pending, error)
            finally:
                self._in_hand.remove(batch)

    async def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        try:
            results = await asyncio.to_thread(self._call, [pending.item for pending in batch])
        except Exception as error:  # noqa: BLE001 -- any model failure: find the items that caused it
            await self._recover(batch, error)
            return
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result)

    async def _recover(self, batch: list[_Pending[Item, Result]], error: Exception) -> None:
        """After ``batch`` failed with ``error``: fail what the screen refuses, run the rest as one batch
        again, and only if that fails too (or nothing was refused), item by item."""
        if self._screen is not None:
            verdicts = await asyncio.to_thread(lambda: [self._verdict(pending.item) for pending in batch])
            for pending, problem in zip(batch, verdicts, strict=True):
                if problem is not None:
                    _settle_error(pending, problem)
            remaining = [pending for pending, problem in zip(batch, verdicts, strict=True) if problem is None]
            if len(remaining) < len(batch) and remaining:
                try:
                    results = await asyncio.to_thread(self._call, [pending.item for pending in remaining])
                except Exception as again:  # noqa: BLE001 -- bad in a way the screen cannot see
                    error = again
                else:
                    for pending, result in zip(remaining, results, strict=True):
                        _settle(pending, result)
                    return
            batch = remaining
        if len(batch) == 1:
            _settle_error(batch[0], error)
            return
        if batch:
            logger.warning("batch of %d failed (%s); retrying items one by one", len(batch), error)
        for pending in batch:
            try:
                (result,) = await asyncio.to_thread(self._call, [pending.item])
            except Exception as single_error:  # noqa: BLE001 -- reported to that caller only
                _settle_error(pending, single_error)
            else:
                _settle(pending, result)

    def _verdict(self, item: Item) -> BaseException | None:
        assert self._screen is not None
        try:
            return self._screen(item)
        except Exception:  # a screen that breaks cannot tell: the item-by-item retry decides
            logger.exception("the batch screen failed")
            return None

    def _call(self, items: list[Item]) -> Sequence[Result]:
        results = self._predict(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results


def _settle(pending: _Pending[Item, Result], result: Result) -> None:
    if not pending.future.done():
        pending.future.set_result(result)


def _settle_error(pending: _Pending[Item, Result], error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
