"""Group commit: the same statement for many concurrent callers, in one round trip and one commit.

A caller hands in its item and waits. While a batch is in the database, the callers that arrive
queue up, and the next batch takes them all: at low load a batch is one item and waits for
nothing; under load one synchronous commit serves every runner that was waiting. An item whose
key is already in the batch (the same order delivered twice) waits for the next one.

If a batch fails with an error from PostgreSQL (a row it refused, an order that vanished), its
items are run again one by one, so the bad one fails alone. Any other error (the database is
unreachable) fails the whole batch: every caller gets it, as it would have on its own.
"""

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import asyncpg

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Runs ``run(items)``, which returns one result per item, for whoever is waiting."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        key: Callable[[Item], Hashable],
    ) -> None:
        self.run, self.key = run, key
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._waiting:
            batch: list[tuple[Item, asyncio.Future[Result]]] = []
            later: list[tuple[Item, asyncio.Future[Result]]] = []
            keys: set[Hashable] = set()
            while self._waiting:
                item, future = entry = self._waiting.popleft()
                if future.done():  # its caller gave up (timeout, shutdown)
                    continue
                if (key := self.key(item)) in keys:
                    later.append(entry)
                else:
                    keys.add(key)
                    batch.append(entry)
            self._waiting.extendleft(reversed(later))
            if batch:
                await self._settle(batch)

    async def _settle(self, batch: list[tuple[Item, "asyncio.Future[Result]"]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
            else:
                alone = [[entry] for entry in batch if not entry[1].done()]
                await asyncio.gather(*(self._settle(entry) for entry in alone))
        except Exception as exc:
            _fail(batch, exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def _fail(batch: Sequence[tuple[object, "asyncio.Future[Any]"]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
