"""shared/amqp.py on a real broker: ``publish_all`` gives an outcome per message, and only a
confirm counts as published (the outbox relay forgets a row on nothing else); ``consume`` hands
over every delivery, in order, without a task each on the fast path.

Every test runs twice: on the fast paths of ``shared.aiormq_private``, and on aiormq's public ones,
which an aiormq that lacks a private name gets."""

import asyncio
import gc
import logging
import threading
import warnings
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq import spec
from aiormq.abc import DeliveredMessage

from shared import aiormq_private, amqp
from shared.messages import Outgoing

EXCHANGE = "test.publishing"


@pytest.fixture(autouse=True, params=["fast", "public"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """On "public", this aiormq looks like a newer one that lacks a private name."""
    monkeypatch.setattr(aiormq_private, "_checked", None)
    if request.param == "public":
        needed = (*aiormq_private.NEEDED, "_gone_in_a_newer_aiormq")
        monkeypatch.setattr(aiormq_private, "NEEDED", needed)
    return str(request.param)


@pytest.fixture
async def confirmed(rabbitmq_url: str) -> AsyncIterator[AbstractChannel]:
    async with await amqp.connect(rabbitmq_url, "test-publishing") as connection:
        yield await amqp.confirmed_channel(connection)


@pytest.fixture
async def bound(confirmed: AbstractChannel) -> AsyncIterator[AbstractQueue]:
    exchange = await confirmed.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT)
    queue = await confirmed.declare_queue("test.publishing", durable=True)
    await queue.purge()
    await queue.bind(exchange, "routed")
    yield queue
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()


def outgoing(n: int) -> Outgoing:
    return Outgoing(b"%d" % n, spec.Basic.Properties(delivery_mode=2, message_id=str(n)))


async def test_each_message_gets_its_own_outcome(
    confirmed: AbstractChannel, bound: AbstractQueue
) -> None:
    routed = await amqp.publish_all(
        confirmed, EXCHANGE, [outgoing(n) for n in range(500)], "routed", 10
    )
    assert routed == [None] * 500
    assert await amqp.publish_all(confirmed, EXCHANGE, [], "routed", 10) == []
    assert (await bound.declare()).message_count == 500

    # Unroutable with mandatory set: returned, so not published, and the channel stays usable.
    unroutable = await amqp.publish_all(confirmed, EXCHANGE, [outgoing(1)], "nowhere", 10)
    assert [type(e) for e in unroutable] == [PublishError]
    assert await amqp.publish_all(confirmed, EXCHANGE, [outgoing(2)], "routed", 10) == [None]
    assert (await bound.declare()).message_count == 501


async def test_what_is_not_confirmed_in_time_is_in_doubt_and_the_channel_recovers(
    confirmed: AbstractChannel, bound: AbstractQueue
) -> None:
    outcomes = await amqp.publish_all(
        confirmed, EXCHANGE, [outgoing(n) for n in range(2_000)], "routed", 0
    )
    assert any(isinstance(e, TimeoutError) for e in outcomes)
    assert all(e is None or isinstance(e, TimeoutError) for e in outcomes)
    assert await amqp.publish_all(confirmed, EXCHANGE, [outgoing(0)], "routed", 10) == [None]
    # Whatever was confirmed is queued; what was in doubt may or may not be.
    assert ((await bound.declare()).message_count or 0) >= outcomes.count(None) + 1


async def test_a_nack_is_that_message_s_own_failure(confirmed: AbstractChannel) -> None:
    """A queue full with ``reject-publish`` nacks: the round's other messages stay confirmed."""
    queue = await confirmed.declare_queue(
        "test.publishing.full",
        durable=True,  # RabbitMQ 4.3 refuses transient non-exclusive queues
        arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
    )
    try:
        await queue.purge()
        outcomes = await amqp.publish_all(
            confirmed, "", [outgoing(n) for n in range(4)], queue.name, 10
        )
        assert outcomes[:2] == [None, None]
        assert [type(e) for e in outcomes[2:]] == [DeliveryError, DeliveryError]
        assert (await queue.declare()).message_count == 2
    finally:
        await queue.delete(if_unused=False, if_empty=False)


async def test_a_channel_closed_under_a_round_leaves_its_messages_in_doubt(
    rabbitmq_url: str, bound: AbstractQueue
) -> None:
    """Closed before the confirms: each message is confirmed or in doubt, none raises."""
    connection = await amqp.connect(rabbitmq_url, "test-publishing-closed")
    channel = await amqp.confirmed_channel(connection)
    round_ = asyncio.create_task(
        amqp.publish_all(channel, EXCHANGE, [outgoing(n) for n in range(2_000)], "routed", 10)
    )
    await asyncio.sleep(0)  # the round is written; its confirms are on their way
    await connection.close()
    outcomes = await round_
    assert any(isinstance(e, ConnectionError) for e in outcomes)
    assert all(e is None or isinstance(e, ConnectionError) for e in outcomes)


async def test_a_confirm_rejected_by_a_clean_close_is_in_doubt() -> None:
    """aiormq rejects what is pending with the close's reason, a bare ``Exception()`` when the
    connection was closed cleanly (seen under load, where the close beat the reader): that is a
    lost channel, not a failure of the message's own."""
    confirm: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    confirm.set_exception(Exception())
    outcome = amqp._outcome(confirm, pending=False, confirm_within=10)
    assert isinstance(outcome, ConnectionError)


async def test_a_message_without_an_id_keeps_it_absent(
    confirmed: AbstractChannel, bound: AbstractQueue, path: str
) -> None:
    """aiormq's own publish invents a message_id; on the fast path both of ours keep a missing one
    missing. Such a message goes without ``mandatory`` (a return could not be matched to it), and
    the channel's delivery tags stay in step for the messages around it."""
    anonymous = Outgoing(b"x", spec.Basic.Properties(delivery_mode=2))
    outcomes = await amqp.publish_all(
        confirmed, EXCHANGE, [outgoing(1), anonymous, outgoing(2)], "routed", 10
    )
    assert outcomes == [None] * 3
    exchange = await confirmed.get_exchange(EXCHANGE)
    await amqp.publish(exchange, aio_pika.Message(b"y"), "routed", 10)
    await amqp.publish(exchange, aio_pika.Message(b"z", message_id="z"), "routed", 10)
    received = []
    while (message := await bound.get(no_ack=True, fail=False)) is not None:
        received.append((message.body, message.message_id))
    if path == "public":  # aiormq's basic_publish gives it a random id
        assert [body for body, _ in received] == [b"1", b"x", b"2", b"y", b"z"]
        assert None not in [id_ for _, id_ in received]
    else:
        assert received == [(b"1", "1"), (b"x", None), (b"2", "2"), (b"y", None), (b"z", "z")]


async def test_consume_hands_over_each_delivery_in_order_from_the_channel_s_reader(
    rabbitmq_url: str, confirmed: AbstractChannel, bound: AbstractQueue, path: str
) -> None:
    assert (
        await amqp.publish_all(confirmed, EXCHANGE, [outgoing(n) for n in range(300)], "routed", 10)
        == [None] * 300
    )
    received: list[DeliveredMessage] = []
    readers: set[asyncio.Task[object] | None] = set()
    async with await amqp.connect(rabbitmq_url, "test-consume") as connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=1_000)

        def receive(delivered: DeliveredMessage) -> None:
            received.append(delivered)
            readers.add(asyncio.current_task())

        tag = await amqp.consume(channel, bound.name, receive)
        async with asyncio.timeout(10):
            while len(received) < 300:
                await asyncio.sleep(0.01)
        assert [m.body for m in received] == [b"%d" % n for n in range(300)]
        # The fast path: one task read them all, none was made per delivery.
        assert len(readers) == (1 if path == "fast" else 300)
        assert (await bound.declare()).message_count == 0  # all 300 held unacked
        last = received[-1].delivery
        assert isinstance(last, spec.Basic.Deliver)
        assert last.delivery_tag is not None
        underlay = await channel.get_underlay_channel()
        await underlay.basic_ack(last.delivery_tag, multiple=True)
        await underlay.basic_cancel(tag)
    assert (await bound.declare()).message_count == 0  # acked, not given back


async def test_an_error_in_receive_closes_the_channel_and_gives_its_deliveries_back(
    rabbitmq_url: str, confirmed: AbstractChannel, bound: AbstractQueue
) -> None:
    await amqp.publish_all(confirmed, EXCHANGE, [outgoing(n) for n in range(20)], "routed", 10)
    seen: list[bytes] = []

    def receive(delivered: DeliveredMessage) -> None:
        seen.append(delivered.body)
        if len(seen) == 3:
            raise RuntimeError("a bug in the receiver")

    async with await amqp.connect(rabbitmq_url, "test-consume") as connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=10)
        await amqp.consume(channel, bound.name, receive)
        async with asyncio.timeout(10):
            await amqp.until_closed(channel)
        assert not connection.is_closed  # the channel only
        async with asyncio.timeout(10):
            while (await bound.declare()).message_count != 20:
                await asyncio.sleep(0.05)
    assert seen[:3] == [b"0", b"1", b"2"]


async def test_a_failed_handshake_leaves_no_connection_for_the_collector_to_close() -> None:
    """Seen in the relay while a broker restarted: ``RuntimeWarning: coroutine 'Connection.close'
    was never awaited``, from aio-pika's ``__del__`` of a connection whose handshake failed, run
    by the collector in a thread without an event loop (the metrics server's)."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # the protocol header, then nothing
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gc.disable()  # the collector runs where this test says, not whenever it likes
    try:
        with pytest.raises(aiormq.exceptions.AMQPConnectionError):
            await amqp.connect(f"amqp://guest:guest@127.0.0.1:{port}/", "test-hang-up")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collector = threading.Thread(target=gc.collect)
            collector.start()
            collector.join()
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


async def test_an_aiormq_without_a_private_name_is_said_once_and_the_public_paths_taken(
    confirmed: AbstractChannel, bound: AbstractQueue, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shared.aiormq_private"):
        for n in range(3):
            outcome = await amqp.publish_all(confirmed, EXCHANGE, [outgoing(n)], "routed", 10)
            assert outcome == [None]
    warned = [r.getMessage() for r in caplog.records if r.name == "shared.aiormq_private"]
    if path == "public":
        assert len(warned) == 1
        assert "lacks _gone_in_a_newer_aiormq" in warned[0]
        assert "aiormq's public paths" in warned[0]
    else:
        assert warned == []


async def test_a_round_that_never_reaches_the_socket_gives_its_delivery_tags_back(
    confirmed: AbstractChannel, bound: AbstractQueue, path: str
) -> None:
    """Ported from aiormq 7.2.4's ``basic_publish``: a write cancelled while the connection's
    frame queue is full (a slow socket) undoes its bookkeeping, or every later confirm of the
    channel would settle the wrong message."""
    underlay = await confirmed.get_underlay_channel()
    assert await amqp.publish_all(confirmed, EXCHANGE, [outgoing(0)], "routed", 10) == [None]
    tag = underlay.delivery_tag
    frames = underlay.write_queue
    full: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
    full.put_nowait(None)
    underlay.write_queue = full
    try:
        round_ = asyncio.create_task(
            amqp.publish_all(confirmed, EXCHANGE, [outgoing(n) for n in range(5)], "routed", 10)
        )
        await asyncio.sleep(0.05)
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
    finally:
        underlay.write_queue = frames
    assert underlay.delivery_tag == tag
    assert underlay.confirmations == {}
    assert not underlay.message_id_delivery_tag
    assert (
        await amqp.publish_all(confirmed, EXCHANGE, [outgoing(n) for n in range(3)], "routed", 10)
        == [None] * 3
    )
    assert (await bound.declare()).message_count == 4
