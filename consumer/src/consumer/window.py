"""The deliveries a consumer holds unacked (its prefetch window), in the order runners take them.

RabbitMQ hands a consumer up to ``prefetch`` messages in queue order (highest priority first).
Inside that window the consumer chooses: each delivery waits in one of three asyncio queues,

- ``asyncio.Queue`` (fifo): oldest first;
- ``asyncio.LifoQueue`` (lifo): newest first, so a depth-first crawl goes deep within the window;
- ``asyncio.PriorityQueue`` (priority): lowest key first (orders: highest priority; crawls: the
  shallowest page);

and runners take from the non-empty queues in turn. Nothing here is acked: a consumer that dies
loses its window to RabbitMQ, which redelivers it.
"""

import asyncio
import itertools
from typing import Any

from consumer.delivery import Delivery
from shared.messages import Frontier

Entry = tuple[int, int, Delivery]  # key, arrival, delivery


class Window:
    def __init__(self) -> None:
        self._queues: dict[Frontier, asyncio.Queue[Entry]] = {
            Frontier.FIFO: asyncio.Queue(),
            Frontier.LIFO: asyncio.LifoQueue(),
            Frontier.PRIORITY: asyncio.PriorityQueue(),
        }
        self._ready = asyncio.Semaphore(0)  # one per delivery waiting
        self._arrival = itertools.count()
        self._turn = itertools.cycle(self._queues.values())
        self.closed = False

    def __len__(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    def put(self, message: Delivery, order: Frontier, key: int = 0) -> None:
        self._queues[order].put_nowait((key, next(self._arrival), message))
        self._ready.release()

    async def get(self) -> Delivery | None:
        """The next delivery to handle; ``None`` once the window is closed."""
        await self._ready.acquire()
        if self.closed:
            self._ready.release()  # wake the next runner too
            return None
        for _ in self._queues:
            queue = next(self._turn)
            if not queue.empty():
                return queue.get_nowait()[2]
        raise AssertionError("a delivery was counted but none is waiting")

    def close(self) -> list[Delivery]:
        """Stop handing out deliveries; returns those never started (again: those put since)."""
        self.closed = True
        self._ready.release()
        left: list[Any] = []
        for queue in self._queues.values():
            while not queue.empty():
                left.append(queue.get_nowait()[2])
        return left
