"""Fixtures over the real broker and database: a clean slate per test, services to start."""

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from yarl import URL

from consumer.service import serve
from producer import outbox
from producer.app import create_app
from shared import db, topology
from shared.settings import ConsumerSettings, ProducerSettings
from testbed.processes import API_KEY, AUTH, Producer, Relay, Service
from tests.integration.proxy import Proxy

TABLES = (
    "reservations, outbox, orders, order_events, inventory, crawl_pages, crawls,"
    " webhook_deliveries, webhook_endpoints, callback_secrets"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid:
            item.add_marker(pytest.mark.integration)


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float = 30, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if result := await check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def clean(rabbitmq_url: str, database_url: str) -> None:
    """An empty schema and empty queues; every test starts here."""
    pool = await db.create_pool(database_url, 2)
    try:
        await db.migrate(pool, 10)
        await pool.execute(f"TRUNCATE {TABLES}")
    finally:
        await pool.close()
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await topology.declare(channel, topology.Kind.CLASSIC)
        for queue in topology.CLASSIC.queues:
            await (await channel.get_queue(queue.name)).purge()


def rabbitmqctl(*args: str) -> None:
    """The broker behind RABBITMQ_URL, managed by RABBITMQCTL (default: the machine's)."""
    ctl = shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))
    assert shutil.which(ctl[0]), (
        "rabbitmqctl is needed to make the test's own vhosts and users"
        " (scripts/rabbitmq4.sh, or apt-get install rabbitmq-server)"
    )
    subprocess.run([*ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.asynccontextmanager
async def vhost(rabbitmq_url: str, name: str) -> AsyncIterator[str]:
    """A vhost of the test's own, ``rabbitmq_url``'s user its operator; its URL."""
    base = URL(rabbitmq_url)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, base.user or "guest", ".*", ".*", ".*")
        yield str(base.with_path(f"/{name}"))
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
async def quorum_url(rabbitmq_url: str) -> AsyncIterator[str]:
    """A vhost of the test's own holding the quorum kind's topology, as setup declares it."""
    async with vhost(rabbitmq_url, f"quorum-{secrets.token_hex(4)}") as url:
        async with await aio_pika.connect(url) as connection:
            await topology.declare(await connection.channel(), topology.Kind.QUORUM)
        yield url


@pytest.fixture(params=list(topology.Kind))
async def each_kind(
    request: pytest.FixtureRequest, rabbitmq_url: str
) -> AsyncIterator[dict[str, Any]]:
    """A test once per queue kind: the settings that point a service at that kind's broker."""
    if request.param is topology.Kind.CLASSIC:
        yield {}
        return
    async with vhost(rabbitmq_url, f"quorum-{secrets.token_hex(4)}") as url:
        async with await aio_pika.connect(url) as connection:
            await topology.declare(await connection.channel(), topology.Kind.QUORUM)
        yield {"rabbitmq_url": url, "queue_kind": "quorum"}


@pytest.fixture
async def conn(database_url: str, clean: None) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
async def channel(rabbitmq_url: str, clean: None) -> AsyncIterator[AbstractChannel]:
    async with await aio_pika.connect(rabbitmq_url) as connection:
        yield await connection.channel()


@pytest.fixture
def producer_settings(rabbitmq_url: str, database_url: str) -> Callable[..., ProducerSettings]:
    def make(**overrides: Any) -> ProducerSettings:
        values: dict[str, Any] = {
            "rabbitmq_url": rabbitmq_url,
            "database_url": database_url,
            "api_keys": f"tests:{API_KEY}",
            "rate_limit_per_second": 0,  # test_auth.py checks the limit
        }
        return ProducerSettings(**{**values, **overrides})

    return make


@pytest.fixture
def consumer_settings(rabbitmq_url: str, database_url: str) -> Callable[..., ConsumerSettings]:
    def make(**overrides: Any) -> ConsumerSettings:
        values: dict[str, Any] = {
            "rabbitmq_url": rabbitmq_url,
            "database_url": database_url,
            "order_work_ms": 0,
            "metrics_port": 0,
            "retry_base_ms": 100,
            "retry_cap_ms": 1_000,
            "crawl_retry_base_ms": 100,
            "crawl_retry_cap_ms": 1_000,
            "webhook_retry_base_ms": 100,
            "webhook_retry_cap_ms": 1_000,
        }
        return ConsumerSettings(**{**values, **overrides})

    return make


ApiFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def start_api(
    clean: None, producer_settings: Callable[..., ProducerSettings]
) -> AsyncIterator[ApiFactory]:
    """Start the producer app in this process; returns an HTTP client for it."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> httpx.AsyncClient:
            app = create_app(producer_settings(**overrides))
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(
                transport=transport, base_url="http://orders.test", headers=AUTH
            )
            await stack.enter_async_context(client)
            client.app = app  # type: ignore[attr-defined]
            return client

        yield start


@pytest.fixture
async def api(start_api: ApiFactory) -> httpx.AsyncClient:
    """The producer app with default settings and the demo catalogue."""
    return await start_api(demo_catalogue=True)


WorkerFactory = Callable[..., Awaitable[asyncio.Event]]


@contextlib.asynccontextmanager
async def _in_process(
    serve: Callable[[Any, asyncio.Event], Awaitable[None]], settings: Callable[..., Any]
) -> AsyncIterator[WorkerFactory]:
    """``start(**overrides)`` runs ``serve`` in this process until the block ends; each start
    returns the event that stops it."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> asyncio.Event:
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(serve(settings(**overrides), stop))))
        return stop

    try:
        yield start
    finally:
        for stop, _ in running:
            stop.set()
        for _, task in running:
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def start_worker(
    clean: None, consumer_settings: Callable[..., ConsumerSettings]
) -> AsyncIterator[WorkerFactory]:
    """Start a worker in this process."""
    async with _in_process(serve, consumer_settings) as start:
        yield start


@pytest.fixture
async def start_relay(
    clean: None, producer_settings: Callable[..., ProducerSettings]
) -> AsyncIterator[WorkerFactory]:
    """Start a relay of its own (``python -m producer relay``) in this process."""

    def settings(**overrides: Any) -> ProducerSettings:
        return producer_settings(**{"port": 0, **overrides})  # port 0: no metrics server

    async with _in_process(outbox.serve, settings) as start:
        yield start


ProxyFactory = Callable[[str], Awaitable[Proxy]]


@pytest.fixture
async def proxy_to() -> AsyncIterator[ProxyFactory]:
    """Start a cuttable proxy in front of a service URL; closed after the test."""
    started: list[Proxy] = []

    async def start(url: str) -> Proxy:
        started.append(await Proxy.to(url).start())
        return started[-1]

    yield start
    for proxy in started:
        await proxy.close()


@pytest.fixture
def spawn(clean: None, rabbitmq_url: str, database_url: str) -> Iterator[Callable[..., Service]]:
    """Start ``python -m producer``, ``python -m consumer`` or, as module ``relay``,
    ``python -m producer relay`` as a real process."""
    started: list[Service] = []

    def start(module: str, name: str, **env: str) -> Service:
        env = {
            "RABBITMQ_URL": rabbitmq_url,
            "DATABASE_URL": database_url,
            "METRICS_PORT": "0",
            **env,
        }
        service: Service
        if module == "producer":
            service = Producer(name, env)
        elif module == "relay":
            service = Relay(name, env)
        else:
            service = Service(module, name, env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


async def set_stock(api: httpx.AsyncClient, **levels: int) -> None:
    for sku, available in levels.items():
        response = await api.put(f"/inventory/{sku}", json={"available": available})
        assert response.status_code == 200, response.text


async def submit(
    api: httpx.AsyncClient, *lines: tuple[str, int], priority: int = 0, **headers: str
) -> str:
    body = {
        "customer_id": "c-1",
        "items": [{"sku": sku, "quantity": q} for sku, q in lines],
        "priority": priority,
    }
    response = await api.post("/orders", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def status_of(api: httpx.AsyncClient, order_id: str) -> dict[str, Any]:
    response = await api.get(f"/orders/{order_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def settled(conn: asyncpg.Connection, ids: list[str], timeout: float = 60) -> None:
    """Wait until every order in ``ids`` is final."""

    async def done() -> bool:
        left = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE id = ANY($1::uuid[])"
            " AND status NOT IN ('completed', 'rejected', 'failed')",
            ids,
        )
        return bool(left == 0)

    await wait_until(done, timeout, f"{len(ids)} orders to settle")


async def depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def consuming(channel: AbstractChannel, n: int = 1) -> bool:
    """At least ``n`` consumers are attached to the work queue."""
    declared = await channel.declare_queue(topology.WORK.name, passive=True)
    return int(declared.declaration_result.consumer_count or 0) >= n
