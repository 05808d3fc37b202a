"""``/dashboard``: a live page of order counts, queue depths, throughput and the latest failures.

One static page (no build step, no CDN) polls ``/dashboard/data`` every two seconds.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from producer import store
from producer.services import ServicesDep

router = APIRouter()
PAGE = (Path(__file__).with_name("dashboard.html")).read_text()
WINDOW_S, BUCKET_S = 300, 10


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> str:
    return PAGE


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
