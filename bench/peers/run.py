"""The peers' command line, in their environment: ``python -m bench.peers.run enqueue PEER TASK
COUNT [PRIORITY [RATE]]`` sends ``COUNT`` tasks and prints the rate as JSON (one at a time for a
blocking client, 1,000 in flight for an async one; ``RATE`` per second when given);
``worker PEER PROCESSES`` runs the peer's worker."""

import asyncio
import importlib
import inspect
import json
import os
import sys
import time
from types import ModuleType

from bench.peers.common import arguments

IN_FLIGHT = 1_000


def enqueue(peer: ModuleType, task: str, count: int, priority: int, rate: float) -> float:
    """Tasks per second, each sent the peer's confirmed, persistent way."""
    if inspect.iscoroutinefunction(peer.send):
        return asyncio.run(_enqueue_async(peer, task, count, priority, rate))
    started = time.perf_counter()
    for n in range(count):
        if rate:
            time.sleep(max(0.0, started + n / rate - time.perf_counter()))
        peer.send(task, arguments(task, n, priority), priority)
    return count / (time.perf_counter() - started)


async def _enqueue_async(
    peer: ModuleType, task: str, count: int, priority: int, rate: float
) -> float:
    await peer.start()
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> None:
        async with slots:
            await peer.send(task, arguments(task, n, priority), priority)

    started = time.perf_counter()
    sent = []
    for n in range(count):
        if rate:
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        sent.append(asyncio.create_task(one(n)))
    await asyncio.gather(*sent)
    took = time.perf_counter() - started
    await peer.stop()
    return count / took


def main() -> None:
    action, name = sys.argv[1], sys.argv[2]
    peer = importlib.import_module(f"bench.peers.{name}_peer")
    if action == "enqueue":
        task, count = sys.argv[3], int(sys.argv[4])
        priority = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        rate = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
        print(json.dumps({"rate": enqueue(peer, task, count, priority, rate)}))
    elif action == "worker":
        command = peer.worker(int(sys.argv[3]))
        tool = os.path.join(os.path.dirname(sys.executable), command[0])
        os.execv(tool, command)  # noqa: S606 -- the peer's own command, from this environment
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main()
