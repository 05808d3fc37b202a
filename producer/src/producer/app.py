"""The FastAPI application: ``create_app(settings)``, whose lifespan opens the ``Services``."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producer import (
    api,
    backlog,
    crawls,
    dashboard,
    events,
    openapi,
    outbox,
    problems,
    store,
    webhooks,
)
from producer.auth import SCHEMES, Guard
from producer.bodies import BodyGuard
from producer.fastpath import SubmitFastPath
from producer.metrics import Metrics, RequestMetrics
from producer.services import Services, require_key
from shared import db
from shared.errors import Misconfigured
from shared.settings import ProducerSettings

# Seeded with DEMO_CATALOGUE=true so the README's curl works right after `make up`.
DEMO_CATALOGUE = {"BOOK-1": 1_000, "BOOK-2": 1_000, "MUG-1": 500, "PEN-1": 5_000, "TSHIRT-M": 200}


def create_app(
    settings: ProducerSettings, misconfigured: Callable[[Misconfigured], None] = lambda _: None
) -> FastAPI:
    """The API; its backlog and inline relay call ``misconfigured`` (after logging why) if the
    broker's queues are not of ``QUEUE_KIND``: ``python -m producer`` then stops."""
    metrics, guard = Metrics.create(), Guard(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await db.create_pool(settings.database_url, settings.db_pool_size)
        try:
            await db.migrate(pool, settings.startup_timeout)
            if settings.demo_catalogue:
                await store.add_stock_once(pool, DEMO_CATALOGUE.items())
            # The relay here, or in ``python -m producer relay``; either is woken by NOTIFY.
            relaying = (
                outbox.running(pool, settings, metrics, misconfigured)
                if settings.relay_inline
                else nullcontext()
            )
            watching = backlog.watching(pool, settings, metrics, misconfigured)
            streaming = events.running(
                pool, settings.database_url, settings.streams_per_key, settings.streams_max
            )
            async with watching as watched, relaying as relay, streaming as hub:
                app.state.services = Services(
                    settings, metrics, guard, pool, watched, store.submitter(pool), relay, hub
                )
                yield
        finally:
            await pool.close()

    app = FastAPI(
        title="Orders",
        version="0.1.0",
        summary="Durable, prioritised order processing over RabbitMQ",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operationId: the function's name
        # Metrics are Prometheus (/metrics); FastAPI's native OpenTelemetry would otherwise look
        # up the global providers on every request (about 4% of the producer's CPU under load).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    problems.install(app)
    openapi.document(app)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    keyed = [Depends(require_key), *SCHEMES]
    app.include_router(api.router, dependencies=keyed)
    app.include_router(crawls.router, dependencies=keyed)
    app.include_router(webhooks.router, dependencies=keyed)
    app.include_router(events.keyed, dependencies=keyed)
    app.include_router(events.router, dependencies=[*SCHEMES, events.TOKEN])  # or a token
    app.include_router(api.health)
    app.include_router(dashboard.router, dependencies=keyed if settings.dashboard_needs_key else [])
    app.add_middleware(RequestMetrics, metrics=metrics, excluded=("/metrics",))
    # Outermost: the valid orders it answers skip FastAPI's machinery; it hands on the rest.
    app.add_middleware(SubmitFastPath, max_body_bytes=settings.max_body_bytes)

    @app.get(
        "/metrics",
        include_in_schema=False,
        dependencies=keyed if settings.metrics_need_key else [],
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
