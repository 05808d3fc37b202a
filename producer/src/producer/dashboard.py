"""``/dashboard``: a live page of order counts, queue depths, throughput and the latest failures.

One static page (no build step, no CDN) polls ``/dashboard/data`` every two seconds.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from producer.api import BacklogDep, PoolDep

router = APIRouter()
PAGE = (Path(__file__).with_name("dashboard.html")).read_text()
WINDOW_S, BUCKET_S = 300, 10


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> str:
    return PAGE


@router.get("/dashboard/data", responses={503: {}})
async def dashboard_data(pool: PoolDep, backlog: BacklogDep) -> dict[str, Any]:
    """Counts by status, queue depths, completions per 10 s over 5 min, the latest failures."""
    counts = await pool.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
    completions = await pool.fetch(
        """SELECT floor(extract(epoch FROM completed_at) / $1) * $1 AS t, count(*) AS n
           FROM orders WHERE completed_at > clock_timestamp() - $2 * interval '1 second'
           GROUP BY 1 ORDER BY 1""",
        BUCKET_S,
        WINDOW_S,
    )
    failures = await pool.fetch(
        """SELECT id, status, reason, updated_at FROM orders
           WHERE status IN ('rejected', 'failed') ORDER BY updated_at DESC LIMIT 10"""
    )
    return {
        "time": datetime.now(UTC).isoformat(),
        "counts": {r["status"]: r["n"] for r in counts},
        "outbox": backlog.outbox_depth,
        "queues": backlog.depths,
        "broker": "connected" if backlog.connected else "unreachable",
        "throughput": {
            "bucket_s": BUCKET_S,
            "window_s": WINDOW_S,
            "points": [[float(r["t"]), r["n"]] for r in completions],
        },
        "failures": [dict(r) for r in failures],
    }
