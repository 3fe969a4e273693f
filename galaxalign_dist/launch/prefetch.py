"""Next-epoch prefetch: a streamed split's next epoch starts while this epoch's last batches train."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

# Start epoch e+1 when epoch e has about this many of e+1's start-ups left to run: twice the last measured
# start-up (time to the first batch), so the next epoch's first batch is ready when this one ends, while
# at most a few seconds of decoded rows wait for it at catalogue scale.
LEAD = 2.0

Opened = tuple[Iterator[Any], Any, float]  # (the epoch's batch iterator, its first batch or None, start-up s)


class EpochPrefetcher:
    """epoch -> its batches, where `open_epoch(e)` iterates epoch e and the next epoch opens early.

    Ray Data runs each epoch of a streamed dataset as a new execution, and its start-up (planning, the
    coordinator's barrier across workers, the first read and decode) left the data side idle for 0.5-1.2 s
    per epoch on a 1,600-row benchmark epoch (benchmarks/RESULTS.md). Epochs alternate between two splits of the
    same dataset (launch/data.py), so epoch e+1 can start on one while epoch e still streams on the other: a
    daemon thread opens it and takes its first batch once the time left in epoch e, estimated from this
    epoch's pace so far, is under LEAD start-ups.

    Epochs must be asked for in order (as the Trainer does); the last one opens nothing after it.
    """

    def __init__(
        self,
        open_epoch: Callable[[int], Iterable[Any]],
        last_epoch: int,
        steps_per_epoch: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._open_epoch = open_epoch
        self._last_epoch = last_epoch
        self._steps = steps_per_epoch
        self._clock = clock
        self._next: tuple[int, Future[Opened]] | None = None  # (epoch, its opening): at most one ahead
        # (epoch, batches of the epoch before it consumed by then): each early open, for logs and tests.
        self.opened_early: list[tuple[int, int]] = []

    def __call__(self, epoch: int) -> Iterator[Any]:
        return self._batches(epoch)

    def _open(self, epoch: int) -> Future[Opened]:
        future: Future[Opened] = Future()

        def run() -> None:
            t0 = self._clock()
            try:
                it = iter(self._open_epoch(epoch))
                future.set_result((it, next(it, None), self._clock() - t0))
            except BaseException as e:  # noqa: BLE001 - re-raised where the epoch is consumed
                future.set_exception(e)

        # A daemon thread: if a run stops early, a thread still waiting at the coordinator's barrier for
        # ranks that are gone must not keep the worker process alive.
        threading.Thread(target=run, name=f"open-epoch-{epoch}", daemon=True).start()
        return future

    def _batches(self, epoch: int) -> Iterator[Any]:
        # A prefetch of any other epoch (epochs asked for out of order) is dropped.
        ahead, self._next = self._next, None
        future = ahead[1] if ahead is not None and ahead[0] == epoch else self._open(epoch)
        it, batch, startup = future.result()
        if batch is None:
            return
        yield batch
        t0, n = self._clock(), 1
        for batch in it:
            yield batch
            n += 1
            if epoch < self._last_epoch and self._next is None:
                per_batch = (self._clock() - t0) / (n - 1)
                if (self._steps - n) * per_batch <= LEAD * startup:
                    self._next = (epoch + 1, self._open(epoch + 1))
                    self.opened_early.append((epoch + 1, n))
