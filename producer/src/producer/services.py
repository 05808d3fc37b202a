"""What a request may use: the services the app's lifespan opened, as one typed object, and the
FastAPI dependencies that hand them (and the caller's key name) to the routes."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import asyncpg
from fastapi import Depends, Request
from starlette.applications import Starlette

from producer.auth import Guard
from producer.backlog import Backlog
from producer.metrics import Metrics
from producer.outbox import Relay
from producer.store import Submitter
from shared.settings import ProducerSettings

if TYPE_CHECKING:  # events.py uses these services
    from producer.events import Hub


@dataclass(frozen=True)
class Services:
    settings: ProducerSettings
    metrics: Metrics
    guard: Guard
    pool: asyncpg.Pool
    backlog: Backlog
    submit: Submitter  # POST /orders's group commit (store.submitter)
    relay: Relay | None  # None when the relay runs as a process of its own
    hub: "Hub"  # the event streams' one listener (events.py)

    @staticmethod
    def of(app: Starlette) -> "Services":
        """The services of ``app``, open while its lifespan runs."""
        services: Services = app.state.services
        return services


# Async, or FastAPI would run them in a thread pool.
async def _services(request: Request) -> Services:
    return Services.of(request.app)


async def _pool(request: Request) -> asyncpg.Pool:
    return Services.of(request.app).pool


ServicesDep = Annotated[Services, Depends(_services)]
PoolDep = Annotated[asyncpg.Pool, Depends(_pool)]  # for routes that need nothing else


async def require_key(request: Request) -> str:
    """The caller's key name, or a 401 / 429 problem (``Guard.admit``)."""
    headers = request.headers
    return Services.of(request.app).guard.admit(
        headers.get("X-API-Key"), headers.get("Authorization")
    )


Caller = Annotated[str, Depends(require_key)]  # the caller's key name (checked once a request)
