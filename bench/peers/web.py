"""Baseline (a)'s app (``bench/bare_app.py``) with a peer behind it, as a web application built on
the peer would be: ``POST /orders`` validates the same model and enqueues the order durably with
the peer named by ``PEERS_PEER`` (a blocking client's send in FastAPI's thread pool, an async
one's awaited). Run by the same uvicorn settings as (a)."""

import importlib
import inspect
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from shared.messages import NewOrder

peer = importlib.import_module(f"bench.peers.{os.environ['PEERS_PEER']}_peer")
BLOCKING = not inspect.iscoroutinefunction(peer.send)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not BLOCKING:
        await peer.start()
    yield
    if not BLOCKING:
        await peer.stop()


app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False}, lifespan=lifespan)


def _task(order: NewOrder) -> tuple[Any, ...]:
    return (order.model_dump(mode="json"),)


if BLOCKING:

    @app.post("/orders", status_code=202)
    def submit(order: NewOrder) -> dict[str, str]:
        peer.send("noop", _task(order), order.priority)
        return {"status": "accepted", "customer_id": order.customer_id}

else:

    @app.post("/orders", status_code=202)
    async def submit_async(order: NewOrder) -> dict[str, str]:
        await peer.send("noop", _task(order), order.priority)
        return {"status": "accepted", "customer_id": order.customer_id}
