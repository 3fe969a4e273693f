"""EpochPrefetcher: epochs in order, the next one opened early by the start-up rule, errors where consumed."""

from __future__ import annotations

import threading

import pytest

from galaxalign_dist.launch.prefetch import LEAD, EpochPrefetcher


class Clock:
    """Seconds per thread: the consumer's pace and each opener thread's start-up are set apart."""

    def __init__(self) -> None:
        self.t: dict[int, float] = {}

    def __call__(self) -> float:
        return self.t.get(threading.get_ident(), 0.0)

    def advance(self, s: float) -> None:
        self.t[threading.get_ident()] = self() + s


def _epochs(clock: Clock, steps: int, startup_s: float, opened: list[int]):  # noqa: ANN202
    def open_epoch(epoch: int):  # noqa: ANN202
        opened.append(epoch)
        clock.advance(startup_s)  # in the opener's thread: its measured start-up
        return iter([f"{epoch}-{i}" for i in range(steps)])

    return open_epoch


def _consume(batches, clock: Clock, per_batch_s: float) -> list[str]:  # noqa: ANN001
    out = []
    for b in batches:
        out.append(b)
        clock.advance(per_batch_s)  # the train step
    return out


def test_epochs_come_whole_and_in_order_and_the_next_opens_at_the_predicted_batch():
    clock, opened = Clock(), []
    steps, startup_s, per_batch_s = 10, 1.0, 0.5
    pre = EpochPrefetcher(
        _epochs(clock, steps, startup_s, opened), last_epoch=2, steps_per_epoch=steps, clock=clock
    )
    for epoch in range(3):
        assert _consume(pre(epoch), clock, per_batch_s) == [f"{epoch}-{i}" for i in range(steps)]
    assert opened == [0, 1, 2]  # nothing after the last epoch
    # Epoch e+1 opens once (steps - n) * per_batch <= LEAD * startup: after batch 6 of 10 here.
    n = steps - int(LEAD * startup_s / per_batch_s)
    assert n == 6
    assert pre.opened_early == [(1, n), (2, n)]


def test_a_fast_start_up_opens_the_next_epoch_only_at_the_end():
    clock, opened = Clock(), []
    pre = EpochPrefetcher(_epochs(clock, 8, 0.0, opened), last_epoch=1, steps_per_epoch=8, clock=clock)
    _consume(pre(0), clock, 1.0)
    assert pre.opened_early == [(1, 8)]
    assert _consume(pre(1), clock, 1.0) == [f"1-{i}" for i in range(8)]


def test_an_error_opening_the_next_epoch_is_raised_where_that_epoch_is_consumed():
    clock = Clock()

    def open_epoch(epoch: int):  # noqa: ANN202
        if epoch == 1:
            raise OSError("shard gone")
        return iter(range(4))

    pre = EpochPrefetcher(open_epoch, last_epoch=1, steps_per_epoch=4, clock=clock)
    assert _consume(pre(0), clock, 1.0) == [0, 1, 2, 3]  # epoch 0 is unaffected
    with pytest.raises(OSError, match="shard gone"):
        next(iter(pre(1)))


def test_an_empty_epoch_yields_nothing():
    pre = EpochPrefetcher(lambda e: iter([]), last_epoch=3, steps_per_epoch=0)
    assert list(pre(0)) == []
