"""The deliveries a consumer holds unacked (its prefetch window), in the order runners take them.

RabbitMQ hands a consumer up to ``prefetch`` messages in queue order (highest priority first).
Inside that window the consumer chooses: each delivery waits in one of three asyncio queues,

- ``asyncio.Queue`` (fifo): oldest first;
- ``asyncio.LifoQueue`` (lifo): newest first, so a depth-first crawl goes deep within the window;
- ``asyncio.PriorityQueue`` (priority): lowest key first (orders: highest priority; crawls: the
  shallowest page);

and runners take from the non-empty queues in turn. Nothing here is acked: a consumer that dies
loses its window to RabbitMQ, which redelivers it. A delivery that waits too long (others kept
going first) can be withdrawn, for the worker to give back to its queue.
"""

import asyncio
import itertools
import time

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
        # What waits, by arrival (the oldest first), with when it came; an entry of the queues
        # that is no longer here was withdrawn, and is skipped.
        self._waiting: dict[int, tuple[float, Delivery]] = {}
        self._ready = asyncio.Semaphore(0)  # one per entry in the queues
        self._arrival = itertools.count()
        self._turn = itertools.cycle(self._queues.values())
        self.empty = asyncio.Event()  # set while nothing waits
        self.empty.set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    def put(self, message: Delivery, order: Frontier, key: int = 0) -> None:
        arrival = next(self._arrival)
        self._waiting[arrival] = (time.monotonic(), message)
        self.empty.clear()
        self._queues[order].put_nowait((key, arrival, message))
        self._ready.release()

    async def get(self) -> Delivery | None:
        """The next delivery to handle; ``None`` once the window is closed."""
        while True:
            await self._ready.acquire()
            if self.closed:
                self._ready.release()  # wake the next runner too
                return None
            _, arrival, message = self._take()
            if self._waiting.pop(arrival, None) is not None:
                if not self._waiting:
                    self.empty.set()
                return message

    def _take(self) -> Entry:
        for _ in self._queues:
            queue = next(self._turn)
            if not queue.empty():
                return queue.get_nowait()
        raise AssertionError("a delivery was counted but none is waiting")

    def withdraw(self, held_longer_than: float) -> list[Delivery]:
        """Take out, the oldest first, the deliveries that have waited longer than that (s)."""
        before = time.monotonic() - held_longer_than
        stale = list(itertools.takewhile(lambda a: self._waiting[a][0] < before, self._waiting))
        withdrawn = [self._waiting.pop(arrival)[1] for arrival in stale]
        if not self._waiting:
            self.empty.set()
        return withdrawn

    def close(self) -> list[Delivery]:
        """Stop handing out deliveries; returns those never started (again: those put since)."""
        self.closed = True
        self._ready.release()
        left = [message for _, message in self._waiting.values()]
        self._waiting.clear()
        self.empty.set()
        for queue in self._queues.values():
            while not queue.empty():
                queue.get_nowait()
        return left
