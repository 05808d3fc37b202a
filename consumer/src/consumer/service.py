"""The consumer process assembled: the pool, the order, crawl and webhook handlers, and one
worker."""

import asyncio

from prometheus_client import CollectorRegistry, Gauge

from consumer.crawler import CrawlHandler
from consumer.fetcher import Fetcher
from consumer.metrics import Metrics
from consumer.orders import OrderHandler
from consumer.webhooks import EndpointMetrics, Sender, WebhookHandler
from consumer.worker import Handler, Worker
from shared import db, topology
from shared.metrics import serving_metrics
from shared.settings import ConsumerSettings


async def serve(settings: ConsumerSettings, stop: asyncio.Event) -> None:
    """Open the pool, migrate, and run one worker with every lane until ``stop``."""
    registry = CollectorRegistry()
    lanes = topology.of(settings.queue_kind)
    runners = settings.concurrency + settings.crawl_concurrency + settings.webhook_concurrency
    with serving_metrics(registry, settings.metrics_port):
        pool = await db.create_pool(settings.database_url, runners + 2)
        try:
            await db.migrate(pool, settings.startup_timeout)
            async with Fetcher(settings.crawler) as fetcher, Sender(settings.webhooks) as sender:
                handlers: list[Handler] = [
                    OrderHandler(pool, settings, Metrics.create(registry, "order", "orders")),
                    CrawlHandler(
                        pool,
                        settings.crawler,
                        Metrics.create(registry, "crawl_task", "crawl_tasks"),
                        fetcher,
                        lanes.crawls,
                    ),
                    WebhookHandler(
                        pool,
                        settings.webhooks,
                        Metrics.create(registry, "webhook", "webhooks"),
                        EndpointMetrics.create(registry),
                        sender,
                        lanes.webhooks,
                    ),
                ]
                consuming = Gauge(
                    "consumer_consuming",
                    "1 while every lane's queue is consumed",
                    registry=registry,
                )
                await Worker(settings, handlers, consuming).run(stop)
        finally:
            await pool.close()
