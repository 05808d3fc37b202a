"""Least privilege, for real: each service's broker user and database role can do its job and
nothing more. Each test makes its own vhost, users and roles, and removes them afterwards."""

import asyncio
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aio_pika
import aiormq
import asyncpg
import httpx
import pytest
from yarl import URL

from consumer.worker import serve
from producer.app import create_app
from shared import setup, topology
from shared.settings import ConsumerSettings, ProducerSettings, SetupSettings
from tests.deploy.test_secrets import load_make_secrets
from tests.faults.nodes import RabbitNode
from tests.integration.conftest import set_stock, settled, submit, wait_until
from tests.integration.processes import API_KEY, AUTH
from tests.integration.site import tree

ROLES = ("producer", "consumer")


def rabbitmqctl(*args: str) -> None:
    tool = shutil.which("rabbitmqctl")
    assert tool, (
        "rabbitmqctl is needed to make the test's own users (apt-get install rabbitmq-server)"
    )
    subprocess.run([tool, "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Broker:
    admin: str  # the operator: the test's usual account, on the test's vhost
    urls: dict[str, str]  # role -> URL with that role's user
    passwords: dict[str, str]


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[Broker]:
    """A vhost of the test's own, with one user per service holding that service's permissions."""
    tag = secrets.token_hex(4)
    vhost = f"security-{tag}"
    base = URL(rabbitmq_url)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, base.user or "guest", ".*", ".*", ".*")
    urls, passwords = {}, {}
    for role in ROLES:
        user, password = f"{role}-{tag}", secrets.token_hex(16)
        rabbitmqctl("add_user", user, password)
        p = topology.PERMISSIONS[role]
        rabbitmqctl("set_permissions", "-p", vhost, user, p.configure, p.write, p.read)
        urls[role] = str(base.with_user(user).with_password(password).with_path(f"/{vhost}"))
        passwords[role] = password
    try:
        yield Broker(str(base.with_path(f"/{vhost}")), urls, passwords)
    finally:
        for role in ROLES:
            rabbitmqctl("delete_user", f"{role}-{tag}")
        rabbitmqctl("delete_vhost", vhost)


@dataclass
class Database:
    owner: str
    urls: dict[str, str]
    users: dict[str, str]
    passwords: dict[str, str]


@pytest.fixture
async def database(database_url: str, clean: None) -> AsyncIterator[Database]:
    """One role per service with that service's privileges, made the way ``setup`` makes them."""
    tag = secrets.token_hex(4)
    users = {role: f"orders_{role}_{tag}" for role in ROLES}
    passwords = {role: secrets.token_urlsafe(16) for role in ROLES}
    base = URL(database_url)
    urls = {r: str(base.with_user(users[r]).with_password(passwords[r])) for r in ROLES}
    yield Database(database_url, urls, users, passwords)
    conn = await asyncpg.connect(database_url)
    try:
        for user in users.values():
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user):
                await conn.execute(f'DROP OWNED BY "{user}"')
                await conn.execute(f'DROP ROLE "{user}"')
    finally:
        await conn.close()


async def run_setup(broker: Broker, database: Database) -> None:
    await setup.run(
        SetupSettings(
            rabbitmq_url=broker.admin,
            database_url=database.owner,
            producer_db_user=database.users["producer"],
            producer_db_password=database.passwords["producer"],
            consumer_db_user=database.users["consumer"],
            consumer_db_password=database.passwords["consumer"],
        )
    )


async def refused(coro: object) -> str:
    """The ACCESS_REFUSED (or similar) reply a broker operation gets."""
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as caught:
        await coro  # type: ignore[misc]
    return str(caught.value)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer callback that is never called."""


async def test_each_broker_user_can_do_only_its_part(broker: Broker, database: Database) -> None:
    await run_setup(broker, database)
    async with await aio_pika.connect(broker.urls["producer"]) as connection:
        channel = await connection.channel()
        await topology.declare(channel, "producer")  # its exchanges, and checks of the rest
        await (await channel.get_exchange("orders")).publish(
            aio_pika.Message(b"{}"), "order.created"
        )
        queue = await channel.get_queue(topology.WORK.name)
        assert "ACCESS_REFUSED" in await refused(queue.consume(_ignore))
    async with await aio_pika.connect(broker.urls["producer"]) as connection:
        channel = await connection.channel()
        dead = await channel.get_exchange(topology.DEAD.name)
        reply = await refused(dead.publish(aio_pika.Message(b"x"), ""))
        assert "ACCESS_REFUSED" in reply
        assert "orders.dead" in reply
    async with await aio_pika.connect(broker.urls["producer"]) as connection:
        channel = await connection.channel()
        assert "ACCESS_REFUSED" in await refused(channel.declare_queue("anything", durable=True))

    async with await aio_pika.connect(broker.urls["consumer"]) as connection:
        channel = await connection.channel()
        await topology.declare(channel, "consumer")
        for exchange in ("orders.retry", "orders.dead", "crawls.retry", "crawls.dead"):
            await (await channel.get_exchange(exchange)).publish(aio_pika.Message(b"x"), "1s")
        message = await (await channel.get_queue(topology.WORK.name)).get(timeout=5)
        assert message is not None  # what the producer published above
        await message.ack()
    for exchange in ("orders", "crawls"):
        async with await aio_pika.connect(broker.urls["consumer"]) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            reply = await refused(target.publish(aio_pika.Message(b"x"), "order.created"))
            assert "ACCESS_REFUSED" in reply
    async with await aio_pika.connect(broker.urls["consumer"]) as connection:
        channel = await connection.channel()
        dead_letters = await channel.get_queue(topology.DEAD_LETTERS.name)
        assert "ACCESS_REFUSED" in await refused(dead_letters.purge())


async def test_a_wrong_password_is_refused(broker: Broker) -> None:
    wrong = str(URL(broker.urls["producer"]).with_password("not-the-password"))
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(wrong, timeout=10)


async def test_each_database_role_has_only_its_privileges(
    broker: Broker, database: Database
) -> None:
    await run_setup(broker, database)
    producer = await asyncpg.connect(database.urls["producer"])
    consumer = await asyncpg.connect(database.urls["consumer"])
    try:
        for conn, statement in (
            (producer, "DELETE FROM orders"),
            (producer, "UPDATE orders SET status = 'completed'"),
            (producer, "DELETE FROM inventory"),
            (producer, "INSERT INTO reservations VALUES (gen_random_uuid(), 'X', 1)"),
            (producer, "CREATE TABLE mine (x int)"),
            (producer, "DROP TABLE outbox"),
            (consumer, "SELECT * FROM outbox"),
            (consumer, "DELETE FROM orders"),
            (consumer, "DELETE FROM reservations"),
            (consumer, "DELETE FROM crawl_pages"),
            (consumer, "INSERT INTO inventory VALUES ('X', 1)"),
            (consumer, "TRUNCATE orders"),
            (consumer, "ALTER TABLE orders ADD COLUMN x int"),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        await producer.fetchval("SELECT count(*) FROM outbox")
        await consumer.fetchval("SELECT count(*) FROM orders")
    finally:
        await producer.close()
        await consumer.close()


async def test_the_services_work_with_only_their_own_rights(
    broker: Broker, database: Database, conn: asyncpg.Connection
) -> None:
    """An order and a crawl go all the way through with the restricted accounts."""
    await run_setup(broker, database)
    app = create_app(
        ProducerSettings(
            rabbitmq_url=broker.urls["producer"],
            database_url=database.urls["producer"],
            demo_catalogue=False,
            crawl_allowed_private_hosts="127.0.0.1",
            api_keys=f"tests:{API_KEY}",
        )
    )
    stop = asyncio.Event()
    settings = ConsumerSettings(
        rabbitmq_url=broker.urls["consumer"],
        database_url=database.urls["consumer"],
        order_work_ms=0,
        metrics_port=0,
        crawl_allowed_private_hosts="127.0.0.1",
        crawl_host_delay_ms=0,
    )
    worker = asyncio.create_task(serve(settings, stop))
    site = await tree(fanout=2, depth=2).start()
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://orders.test", headers=AUTH
            ) as api,
        ):
            await conn.execute("INSERT INTO inventory VALUES ('PEN-1', 5)")
            order = await submit(api, ("PEN-1", 2))
            await settled(conn, [order])
            assert (await api.get(f"/orders/{order}")).json()["status"] == "completed"
            crawl = (await api.post("/crawls", json={"url": site.root})).json()["id"]

            async def crawled() -> bool:
                return (await api.get(f"/crawls/{crawl}")).json()["status"] == "completed"

            await wait_until(crawled, 30, "the crawl")
            assert (await api.get(f"/crawls/{crawl}")).json()["fetched"] == 7
            await set_stock(api, **{"PEN-1": 9})
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
        await site.stop()


async def test_services_read_secrets_from_files_and_never_log_them(
    broker: Broker, database: Database, spawn, tmp_path
) -> None:
    """Passwords and the API key reach the services as files (as compose mounts them), and no
    line any service logs, at DEBUG, contains one."""
    await run_setup(broker, database)
    key = secrets.token_urlsafe(24)
    files = {"api_keys": f"ops:{key}", **{f"amqp_{r}": broker.passwords[r] for r in ROLES}}
    files |= {f"db_{r}": database.passwords[r] for r in ROLES}
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")

    def env(role: str) -> dict[str, str]:
        return {
            "RABBITMQ_URL": str(URL(broker.urls[role]).with_password(None)),
            "RABBITMQ_PASSWORD_FILE": str(tmp_path / f"amqp_{role}"),
            "DATABASE_URL": str(URL(database.urls[role]).with_password(None)),
            "DATABASE_PASSWORD_FILE": str(tmp_path / f"db_{role}"),
            "LOG_LEVEL": "DEBUG",
        }

    producer = spawn(
        "producer",
        "producer-secrets",
        API_KEYS="",
        **env("producer"),
        API_KEYS_FILE=str(tmp_path / "api_keys"),
        DEMO_CATALOGUE="true",
    )
    await producer.wait_healthy()
    consumer = spawn("consumer", "consumer-secrets", **env("consumer"), ORDER_WORK_MS="0")
    await consumer.wait_for_log("consuming")
    async with httpx.AsyncClient(base_url=producer.base_url) as api:
        assert (
            await api.post("/orders", json={}, headers={"X-API-Key": "nope"})
        ).status_code == 401
        response = await api.post(
            "/orders",
            json={"customer_id": "c", "items": [{"sku": "PEN-1", "quantity": 1}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 202, response.text
        order = response.json()["id"]

        async def done() -> bool:
            found = (await api.get(f"/orders/{order}", headers={"X-API-Key": key})).json()
            return bool(found["status"] == "completed")

        await wait_until(done, 30, "the order")
    consumer.signal(signal.SIGTERM)
    assert await consumer.wait(30) == 0
    producer.signal(signal.SIGTERM)
    await producer.wait(30)  # uvicorn re-raises SIGTERM once it has shut down
    logs = producer.log() + consumer.log()
    assert "DEBUG" in logs or "debug" in logs  # the services did log, verbosely
    for secret in (key, *broker.passwords.values(), *database.passwords.values()):
        assert secret not in logs


async def test_the_generated_definitions_make_the_users_and_no_guest(tmp_path) -> None:
    """What ``make up`` gives RabbitMQ, loaded at boot by a node of the test's own."""
    make_secrets = load_make_secrets()

    node = RabbitNode()
    make_secrets.ensure(node.dir / "secrets")
    node.configure(f"load_definitions = {node.dir / 'secrets' / 'rabbitmq-definitions.json'}\n")
    await node.start()
    try:
        base = URL(node.url("orders"))
        passwords = {
            r: (node.dir / "secrets" / f"{r}-amqp-password").read_text().strip()
            for r in ("operator", "producer", "consumer")
        }
        operator = str(base.with_user("operator").with_password(passwords["operator"]))
        async with await aio_pika.connect(operator) as connection:
            await topology.declare(await connection.channel())
        producer = str(base.with_user("producer").with_password(passwords["producer"]))
        async with await aio_pika.connect(producer) as connection:
            channel = await connection.channel()
            await topology.declare(channel, "producer")
            assert "ACCESS_REFUSED" in await refused(
                (await channel.get_queue(topology.WORK.name)).consume(_ignore)
            )
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(node.url("orders"), timeout=10)  # guest/guest
    finally:
        await node.stop()
