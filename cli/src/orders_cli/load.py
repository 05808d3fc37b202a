"""``orders load``: paced HTTP load with a progress bar, then a summary of what happened."""

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shared.db import FINAL


@dataclass
class Summary:
    sent: int = 0
    accepted: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    final: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def parse_mix(mix: str) -> list[tuple[int, float]]:
    """``"0:90,9:10"`` → priority 0 with weight 90, priority 9 with weight 10."""
    usage = "priorities 0-9 with non-negative weights, like 0:90,9:10"
    pairs = []
    for part in mix.split(","):
        priority, _, weight = part.partition(":")
        try:
            pairs.append((int(priority), float(weight or 1)))
        except ValueError:
            raise ValueError(f"{part!r} is not PRIORITY:WEIGHT: {usage}") from None
    if any(not 0 <= p <= 9 or not w >= 0 for p, w in pairs):  # `not >=`: nan is no weight
        raise ValueError(usage)
    return pairs


async def run(
    client: httpx.AsyncClient,
    count: int,
    rate: float,
    mix: list[tuple[int, float]],
    items: list[dict[str, object]],
    wait_s: float,
) -> Summary:
    summary = Summary()
    priorities, weights = zip(*mix, strict=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("submitting", total=count)

        async def one(priority: int) -> None:
            body = {"customer_id": "load", "items": items, "priority": priority}
            started = time.perf_counter()
            try:
                response = await client.post("/orders", json=body)
            except httpx.HTTPError as exc:
                summary.errors[type(exc).__name__] = summary.errors.get(type(exc).__name__, 0) + 1
            else:
                summary.latencies_ms.append((time.perf_counter() - started) * 1000)
                if response.status_code == 202:
                    summary.accepted.append(response.json()["id"])
                else:
                    key = str(response.status_code)
                    summary.errors[key] = summary.errors.get(key, 0) + 1
            progress.advance(task)

        started = time.perf_counter()
        tasks = []
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(random.choices(priorities, weights)[0])))
            summary.sent += 1
        await asyncio.gather(*tasks)
        summary.elapsed_s = time.perf_counter() - started
        if wait_s > 0 and summary.accepted:
            watch = progress.add_task("settling", total=len(summary.accepted))
            summary.final = await _settle(client, summary.accepted, wait_s, progress, watch)
    return summary


async def _settle(
    client: httpx.AsyncClient, ids: list[str], wait_s: float, progress: Progress, task: object
) -> dict[str, int]:
    """Poll each accepted order until it is final or ``wait_s`` passes; counts by status."""
    status: dict[str, str] = {}
    slots = asyncio.Semaphore(32)
    deadline = time.monotonic() + wait_s

    async def check(order_id: str) -> None:
        async with slots:
            response = await client.get(f"/orders/{order_id}")
            if response.status_code == 200:
                status[order_id] = response.json()["status"]

    while time.monotonic() < deadline:
        pending = [i for i in ids if status.get(i) not in FINAL]
        if not pending:
            break
        await asyncio.gather(*(check(i) for i in pending))
        progress.update(task, completed=sum(s in FINAL for s in status.values()))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
    counts: dict[str, int] = {}
    for order_id in ids:
        counts[status.get(order_id, "unknown")] = counts.get(status.get(order_id, "unknown"), 0) + 1
    return counts
