"""shared/batch.py: who shares a batch, and who fails when a batch fails."""

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest

from shared.batch import Batcher


class Recorder:
    """A ``run`` that records its batches, answers ``item * 10`` and fails on request."""

    def __init__(self, fail_on: int | None = None, error: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on, self.error = fail_on, error

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0.01)  # the round trip, while more callers arrive
        if self.error is not None and (self.fail_on is None or self.fail_on in items):
            raise self.error
        return [item * 10 for item in items]


async def test_callers_that_arrive_during_a_batch_share_the_next_one() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, key=lambda i: i)
    first = asyncio.create_task(batcher(0))
    await asyncio.sleep(0)  # the first batch is in the database
    rest = [asyncio.create_task(batcher(i)) for i in range(1, 50)]
    assert await asyncio.gather(first, *rest) == [i * 10 for i in range(50)]
    assert run.batches == [[0], list(range(1, 50))]


async def test_the_same_key_twice_waits_for_the_next_batch() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, key=lambda i: i % 3)
    assert await asyncio.gather(*(batcher(i) for i in range(7))) == [i * 10 for i in range(7)]
    assert run.batches == [[0, 1, 2], [3, 4, 5], [6]]


async def test_a_row_the_database_refuses_fails_alone() -> None:
    run = Recorder(fail_on=3, error=asyncpg.NotNullViolationError("null value in column"))
    batcher: Batcher[int, int] = Batcher(run, key=lambda i: i)
    results = await asyncio.gather(*(batcher(i) for i in range(6)), return_exceptions=True)
    assert isinstance(results[3], asyncpg.NotNullViolationError)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]
    assert run.batches[0] == [0, 1, 2, 3, 4, 5]  # then each alone
    assert sorted(run.batches[1:]) == [[0], [1], [2], [3], [4], [5]]


async def test_an_unreachable_database_fails_the_whole_batch_at_once() -> None:
    run = Recorder(error=ConnectionRefusedError("connection refused"))
    batcher: Batcher[int, int] = Batcher(run, key=lambda i: i)
    results = await asyncio.gather(*(batcher(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert run.batches == [[0, 1, 2, 3, 4]]  # no retry one by one


async def test_a_caller_that_gave_up_is_left_out() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, key=lambda i: i)
    first = asyncio.create_task(batcher(0))
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher(1))
    kept = asyncio.create_task(batcher(2))
    await asyncio.sleep(0)
    gone.cancel()
    assert await first == 0
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert run.batches == [[0], [2]]
