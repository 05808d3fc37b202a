"""Least privilege, for real: each service's broker user and database role can do its job and
nothing more. Each test makes its own vhost, users and roles, and removes them afterwards."""

import asyncio
import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import asyncpg
import httpx
import orjson
import pytest
from yarl import URL

from consumer import dlq
from consumer.service import serve
from producer.app import create_app
from shared import setup, topology
from shared.settings import ConsumerSettings, ProducerSettings, SetupSettings
from testbed.processes import API_KEY, AUTH
from tests.deploy.test_secrets import load_make_secrets
from tests.faults.nodes import RabbitNode
from tests.integration.conftest import (
    consuming,
    rabbitmqctl,
    set_stock,
    settled,
    submit,
    wait_until,
)
from tests.integration.site import tree

ROLES = ("producer", "consumer")


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
        await topology.declare(
            channel, topology.Kind.CLASSIC, "producer"
        )  # its exchanges, and checks of the rest
        await (await channel.get_exchange("orders")).publish(
            aio_pika.Message(b"{}"), "order.created"
        )
        queue = await channel.get_queue(topology.WORK.name)
        assert "ACCESS_REFUSED" in await refused(queue.consume(_ignore))
    for exchange in (topology.DEAD.name, topology.RETRY.name):
        async with await aio_pika.connect(broker.urls["producer"]) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            reply = await refused(target.publish(aio_pika.Message(b"x"), "1s"))
            assert "ACCESS_REFUSED" in reply
            assert exchange in reply
    async with await aio_pika.connect(broker.urls["producer"]) as connection:
        channel = await connection.channel()
        assert "ACCESS_REFUSED" in await refused(channel.declare_queue("anything", durable=True))

    async with await aio_pika.connect(broker.urls["consumer"]) as connection:
        channel = await connection.channel()
        await topology.declare(channel, topology.Kind.CLASSIC, "consumer")
        for lane in ("orders", "crawls", "webhooks"):
            for exchange in (f"{lane}.retry", f"{lane}.dead"):
                await (await channel.get_exchange(exchange)).publish(aio_pika.Message(b"x"), "1s")
        message = await (await channel.get_queue(topology.WORK.name)).get(timeout=5)
        assert message is not None  # what the producer published above
        await message.ack()
    for exchange in ("orders", "crawls", "webhooks"):
        async with await aio_pika.connect(broker.urls["consumer"]) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            reply = await refused(target.publish(aio_pika.Message(b"x"), "order.created"))
            assert "ACCESS_REFUSED" in reply
    async with await aio_pika.connect(broker.urls["consumer"]) as connection:
        channel = await connection.channel()
        dead_letters = await channel.get_queue(topology.DEAD_LETTERS.name)
        assert "ACCESS_REFUSED" in await refused(dead_letters.purge())
    async with await aio_pika.connect(broker.urls["consumer"]) as connection:
        channel = await connection.channel()
        assert "ACCESS_REFUSED" in await refused(channel.declare_queue("anything", durable=True))


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
            # Events are the triggers' to write: nobody forges or erases one.
            (
                producer,
                "INSERT INTO order_events (order_id, type, status, attempts)"
                " VALUES (gen_random_uuid(), 'completed', 'completed', 1)",
            ),
            (producer, "DELETE FROM order_events"),
            (consumer, "SELECT * FROM order_events"),
            (
                consumer,
                "INSERT INTO order_events (order_id, type, status, attempts)"
                " VALUES (gen_random_uuid(), 'completed', 'completed', 1)",
            ),
            (consumer, "SELECT expire_order_events('0 s', 1)"),
            # An endpoint is enabled again, never pointed elsewhere or its secret read.
            (producer, "UPDATE webhook_endpoints SET url = 'http://example.com/'"),
            (producer, "SELECT secret FROM webhook_endpoints"),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        await producer.fetchval("SELECT count(*) FROM outbox")
        await producer.fetchval("SELECT count(*) FROM order_events")
        await producer.fetchval("SELECT expire_order_events('7 days', 1)")
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
            webhook_allowed_private_hosts="127.0.0.1",
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
            hook = (await api.post("/webhooks", json={"url": "http://127.0.0.1:9/"})).json()["id"]
            await conn.execute(
                "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = 'test'"
            )
            enabled = await api.post(f"/webhooks/{hook}/enable")
            assert enabled.status_code == 200, enabled.text
            assert enabled.json()["disabled_at"] is None
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
    await consumer.wait_for_event("consuming")
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
            await topology.declare(await connection.channel(), topology.Kind.CLASSIC)
        producer = str(base.with_user("producer").with_password(passwords["producer"]))
        async with await aio_pika.connect(producer) as connection:
            channel = await connection.channel()
            await topology.declare(channel, topology.Kind.CLASSIC, "producer")
            assert "ACCESS_REFUSED" in await refused(
                (await channel.get_queue(topology.WORK.name)).consume(_ignore)
            )
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(node.url("orders"), timeout=10)  # guest/guest
    finally:
        await node.stop()


# What each broker role can cause through the broker alone: one test per line of the table in
# docs/security.md ("What a broker role can cause"). The worker runs with the consumer's rights.


@dataclass
class Deployed:
    broker: Broker
    conn: asyncpg.Connection
    operator: ConsumerSettings  # the dead-letter tools' rights: the test's own accounts

    async def publish(
        self, role: str, exchange: str, routing_key: str, body: dict[str, Any], **props: Any
    ) -> None:
        """A persistent message, published with ``role``'s rights and confirmed."""
        async with await aio_pika.connect(self.broker.urls[role]) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange, ensure=False)
            properties = {"content_type": "application/json", "delivery_mode": 2} | props
            await target.publish(aio_pika.Message(orjson.dumps(body), **properties), routing_key)

    async def dead_letters(self, lane: topology.Lane, n: int) -> dict[str, dict[str, Any]]:
        """Wait for ``n`` dead letters in ``lane``; their headers by message id (left in place)."""

        async def arrived() -> list[aio_pika.abc.AbstractIncomingMessage] | None:
            async with await aio_pika.connect(self.broker.admin) as connection:
                queue = await (await connection.channel()).get_queue(lane.dead_letters.name)
                taken = []
                while (message := await queue.get(no_ack=False, fail=False)) is not None:
                    taken.append(message)
                return taken if len(taken) >= n else None  # unacked: back when it closes

        letters = await wait_until(arrived, 30, f"{n} dead letter(s) in {lane.dead.name}")
        return {m.message_id or "": dict(m.headers or {}) for m in letters}


@pytest.fixture
async def deployed(
    broker: Broker, database: Database, conn: asyncpg.Connection, start_worker: Any
) -> Deployed:
    await run_setup(broker, database)
    await conn.execute("INSERT INTO inventory VALUES ('PEN-1', 10)")
    await start_worker(
        rabbitmq_url=broker.urls["consumer"],
        database_url=database.urls["consumer"],
        retry_base_ms=100,
    )
    async with await aio_pika.connect(broker.admin) as connection:
        channel = await connection.channel()
        await wait_until(lambda: consuming(channel), 30, "the worker")
    operator = ConsumerSettings(rabbitmq_url=broker.admin, database_url=database.owner)
    return Deployed(broker, conn, operator)


def an_order(order_id: uuid.UUID, quantity: int = 1) -> dict[str, Any]:
    return {
        "version": 1,
        "id": str(order_id),
        "customer_id": "c-roles",
        "items": [{"sku": "PEN-1", "quantity": quantity}],
        "priority": 0,
    }


ORDER = {"type": "order.created"}


async def completed(conn: asyncpg.Connection, order_id: uuid.UUID) -> None:
    async def done() -> bool:
        status = await conn.fetchval("SELECT status FROM orders WHERE id = $1", order_id)
        return bool(status == "completed")

    await wait_until(done, 30, f"order {order_id} to complete")


async def stock(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT available FROM inventory WHERE sku = 'PEN-1'"))


async def test_a_producer_may_publish_an_order_the_database_does_not_hold_yet(
    deployed: Deployed,
) -> None:
    """The message contract lets any client with the producer's rights publish orders."""
    order_id = uuid.uuid4()
    await deployed.publish(
        "producer",
        "orders",
        "order.created",
        an_order(order_id, 3),
        message_id=str(order_id),
        **ORDER,
    )
    await completed(deployed.conn, order_id)
    assert await stock(deployed.conn) == 7


async def test_a_consumer_cannot_create_an_order_through_a_retry_queue(
    deployed: Deployed,
) -> None:
    """The attack: a new order sent to ``orders.retry``, which dead-letters it into the work
    queue. Whatever its ``attempt`` header says, it went through a retry queue (the broker's
    ``x-death``), so it may only continue an order the database holds."""
    forged = {uuid.uuid4(): {"attempt": 2}, uuid.uuid4(): {"attempt": 1}, uuid.uuid4(): {}}
    for order_id, headers in forged.items():
        await deployed.publish(
            "consumer",
            "orders.retry",
            "100ms",
            an_order(order_id),
            message_id=str(order_id),
            headers=headers,
            **ORDER,
        )
    letters = await deployed.dead_letters(topology.CLASSIC.orders, 3)
    assert set(letters) == {str(i) for i in forged}
    for headers in letters.values():
        assert headers["error-type"] == "Unrecognised"
        assert "only continues an order the database holds" in headers["error-message"]
    assert await deployed.conn.fetchval("SELECT count(*) FROM orders") == 0
    assert await deployed.conn.fetchval("SELECT count(*) FROM reservations") == 0
    assert await stock(deployed.conn) == 10


async def test_a_consumer_cannot_change_what_an_order_reserves(deployed: Deployed) -> None:
    """A retry of a real order with other lines is not believed: the order is left as it was,
    and its own message then completes it with its own lines."""
    order_id = uuid.uuid4()
    await deployed.conn.execute(
        "INSERT INTO orders (id, customer_id, items, priority, status) VALUES"
        " ($1, 'c-roles', '[{\"sku\": \"PEN-1\", \"quantity\": 1}]', 0, 'accepted')",
        order_id,
    )
    await deployed.publish(
        "consumer",
        "orders.retry",
        "100ms",
        an_order(order_id, quantity=9),
        message_id=str(order_id),
        headers={"attempt": 2},
        **ORDER,
    )
    letters = await deployed.dead_letters(topology.CLASSIC.orders, 1)
    assert letters[str(order_id)]["error-type"] == "Unrecognised"
    row = await deployed.conn.fetchrow(
        "SELECT status, attempts FROM orders WHERE id = $1", order_id
    )
    assert (row["status"], row["attempts"]) == ("accepted", 0)
    assert await stock(deployed.conn) == 10

    await deployed.publish(
        "producer", "orders", "order.created", an_order(order_id), message_id=str(order_id), **ORDER
    )
    await completed(deployed.conn, order_id)
    assert await stock(deployed.conn) == 9


async def test_a_consumer_can_only_duplicate_an_order_and_a_duplicate_changes_nothing(
    deployed: Deployed,
) -> None:
    order_id = uuid.uuid4()
    body = an_order(order_id, 2)
    await deployed.publish(
        "producer", "orders", "order.created", body, message_id=str(order_id), **ORDER
    )
    await completed(deployed.conn, order_id)
    await deployed.publish(
        "consumer", "orders.retry", "100ms", body, message_id=str(order_id), **ORDER
    )

    async def seen_twice() -> bool:
        attempts = await deployed.conn.fetchval(
            "SELECT attempts FROM orders WHERE id = $1", order_id
        )
        return bool(attempts == 1) and await _work_queue_empty(deployed)

    await wait_until(seen_twice, 30, "the duplicate to be consumed")
    await asyncio.sleep(0.5)  # it was acked with no effect
    assert await stock(deployed.conn) == 8
    assert await deployed.conn.fetchval("SELECT count(*) FROM reservations") == 1


async def _work_queue_empty(deployed: Deployed) -> bool:
    async with await aio_pika.connect(deployed.broker.admin) as connection:
        channel = await connection.channel()
        queues = [topology.WORK.name, *(q.name for q in topology.CLASSIC.orders.retry_queues)]
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            if declared.declaration_result.message_count:
                return False
        return True


async def test_a_consumer_can_only_resend_a_stored_webhook_delivery(deployed: Deployed) -> None:
    """A delivery nobody's event made, and one with a URL of the publisher's choosing, are not
    believed; a stored delivery sent again is a duplicate that changes nothing."""
    endpoint = uuid.uuid4()
    await deployed.conn.execute(
        "INSERT INTO webhook_endpoints (id, api_key, url, event_types, secret)"
        " VALUES ($1, 'k', 'http://127.0.0.1:9/hook', '{order.completed}', 'whsec_AAAA')",
        endpoint,
    )
    delivered = await deployed.conn.fetchval(
        "INSERT INTO webhook_deliveries (endpoint_id, url, event_id, order_id, payload, status,"
        " attempts, unpublished) VALUES ($1, 'http://127.0.0.1:9/hook', 1, $2, '{}',"
        " 'delivered', 1, false) RETURNING id",
        endpoint,
        uuid.uuid4(),
    )
    made_up = uuid.uuid4()
    bodies = [
        (delivered, {"version": 1, "delivery_id": str(delivered)}),  # sent again: a duplicate
        (made_up, {"version": 1, "delivery_id": str(made_up)}),  # no such delivery
        # a real one, sent elsewhere: the contract has no URL, so the message is poison
        (delivered, {"version": 1, "delivery_id": str(delivered), "url": "http://10.0.0.1/"}),
    ]
    for delivery_id, body in bodies:  # one retry queue: handed to the worker in this order
        await deployed.publish(
            "consumer",
            "webhooks.retry",
            "100ms",
            body,
            message_id=str(delivery_id),
            type="webhook.delivery",
            headers={"attempt": 2},
        )
    letters = await deployed.dead_letters(topology.CLASSIC.webhooks, 2)
    assert {h["error-type"] for h in letters.values()} == {"Unrecognised", "InvalidMessage"}
    row = await deployed.conn.fetchrow(
        "SELECT status, attempts FROM webhook_deliveries WHERE id = $1", delivered
    )
    assert (row["status"], row["attempts"]) == ("delivered", 1)
    assert await deployed.conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


async def test_a_consumer_cannot_create_or_redirect_a_crawl_task(deployed: Deployed) -> None:
    """A task for a page nobody queued, and one naming a real page with another URL, are not
    believed; the real page is untouched."""
    crawl_id = uuid.uuid4()
    await deployed.conn.execute(
        "INSERT INTO crawls (id, root_url, frontier, max_depth, max_pages, allowed_hosts, status,"
        " pages) VALUES ($1, 'http://127.0.0.1:9/', 'fifo', 1, 10, '{127.0.0.1}', 'running', 1)",
        crawl_id,
    )
    page_id = await deployed.conn.fetchval(
        "INSERT INTO crawl_pages (crawl_id, url, depth, unpublished) VALUES"
        " ($1, 'http://127.0.0.1:9/', 0, false) RETURNING id",
        crawl_id,
    )
    tasks = {
        uuid.uuid4(): (crawl_id, "http://127.0.0.1:9/other"),  # no such page
        page_id: (crawl_id, "http://127.0.0.1:9/elsewhere"),  # a real page, another URL
    }
    for task_page, (task_crawl, url) in tasks.items():
        await deployed.publish(
            "consumer",
            "crawls.retry",
            "100ms",
            {
                "version": 1,
                "crawl_id": str(task_crawl),
                "page_id": str(task_page),
                "url": url,
                "depth": 0,
                "frontier": "fifo",
            },
            message_id=str(task_page),
            type="crawl.task",
            headers={"attempt": 2},
        )
    letters = await deployed.dead_letters(topology.CLASSIC.crawls, 2)
    assert set(letters) == {str(p) for p in tasks}
    assert {h["error-type"] for h in letters.values()} == {"Unrecognised"}
    pages = await deployed.conn.fetch("SELECT id, status, attempts FROM crawl_pages")
    assert [(p["id"], p["status"], p["attempts"]) for p in pages] == [(page_id, "queued", 0)]


async def test_a_dead_letter_naming_no_order_is_never_replayed(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    """A consumer may publish to ``orders.dead``; what it puts there cannot become an order."""
    forged = uuid.uuid4()
    await deployed.publish(
        "consumer", "orders.dead", "", an_order(forged), message_id=str(forged), **ORDER
    )
    await deployed.dead_letters(topology.CLASSIC.orders, 1)
    assert await dlq.command(deployed.operator, "replay", every=True) == 1
    assert f"naming nothing the database holds: {forged}" in capsys.readouterr().err
    assert set(await deployed.dead_letters(topology.CLASSIC.orders, 1)) == {str(forged)}
    await asyncio.sleep(1)  # nothing reached the work queue to be created
    assert await deployed.conn.fetchval("SELECT count(*) FROM orders") == 0
