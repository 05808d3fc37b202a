"""``/dashboard``: a live page of order counts, queue depths, throughput and the latest failures.

One static page (no build step, no CDN) reads ``/dashboard/events``: the data of
``/dashboard/data`` at once, then again after each burst of order events (the event hub's,
events.py), at most once a second, and every five seconds when nothing happens.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from producer import store
from producer.services import ServicesDep

router = APIRouter()
PAGE = (Path(__file__).with_name("dashboard.html")).read_text()
WINDOW_S, BUCKET_S = 300, 10
IDLE_S, COALESCE_S = 5.0, 1.0  # the stream's update when nothing changes; its most frequent


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> str:
    return PAGE


async def _room(services: ServicesDep) -> AsyncIterator[None]:
    """A stream slot (events.py), shared by every dashboard of this process."""
    async with services.hub.slot("(dashboard)"):
        yield


@router.get(
    "/dashboard/events",
    response_class=EventSourceResponse,
    responses={429: {}, 503: {}},
    dependencies=[Depends(_room)],
)
async def dashboard_events(services: ServicesDep) -> AsyncIterator[ServerSentEvent]:
    """The dashboard's data (``update`` events, as ``/dashboard/data`` has it) when it changes."""
    async with services.hub.watching() as changed:
        while True:
            data = await dashboard_data(services)
            yield ServerSentEvent(event="update", raw_data=orjson.dumps(data, default=str).decode())
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), IDLE_S)
            await asyncio.sleep(COALESCE_S)  # a burst of events, one update


@router.get("/dashboard/data", responses={503: {}})
async def dashboard_data(services: ServicesDep) -> dict[str, Any]:
    """Counts by status, queue depths, completions per 10 s over 5 min, the latest failures."""
    pool, backlog = services.pool, services.backlog
    counts = await store.counts_by_status(pool)
    points = await store.completions(pool, BUCKET_S, WINDOW_S)
    failures = await store.latest_failures(pool, 10)
    return {
        "time": datetime.now(UTC).isoformat(),
        "counts": counts,
        "outbox": backlog.outbox_depth,
        "queues": backlog.depths,
        "broker": "connected" if backlog.connected else "unreachable",
        "throughput": {
            "bucket_s": BUCKET_S,
            "window_s": WINDOW_S,
            "points": points,
        },
        "failures": failures,
    }
