"""The message contract and the topology, without a broker."""

import re
import time
import uuid
from typing import Any

import aio_pika
import orjson
import pytest
from aiormq.abc import DeliveredMessage
from asyncpg.pgproto import pgproto
from pamqp import commands
from pamqp.common import FieldTable

from consumer.delivery import Delivery
from shared import messages, topology
from shared.errors import InvalidMessage

ORDER = messages.OrderMessage(
    id=uuid.uuid4(), customer_id="c-1", items=[messages.Item(sku="A-1", quantity=2)], priority=4
)
ORDER_BODY = orjson.dumps(ORDER.model_dump(mode="json"))


def delivered(message: aio_pika.Message | messages.Outgoing) -> DeliveredMessage:
    """The frames a consumer would receive for ``message``."""
    props = message.properties
    frame = commands.Basic.Deliver(delivery_tag=1, exchange="orders", routing_key="order.created")
    return DeliveredMessage(delivery=frame, header=_header(props), body=message.body, channel=None)  # type: ignore[arg-type]


def delivery(message: aio_pika.Message | messages.Outgoing) -> Delivery:
    """What the consumer's worker hands its handlers for ``message``."""
    return Delivery(delivered(message))


def _header(props: Any) -> Any:
    from pamqp.header import ContentHeader

    return ContentHeader(properties=props)


def raw(
    body: bytes,
    type_: str | None = "order.created",
    headers: FieldTable | None = None,
    message_id: str | None = None,
) -> Delivery:
    return delivery(
        aio_pika.Message(
            body,
            type=type_,
            content_type="application/json",
            headers=headers,
            message_id=message_id,
        )
    )


def test_encode_sets_every_property_the_contract_names() -> None:
    message = messages.encode(ORDER)
    props = message.properties
    assert props.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert props.content_type == "application/json"
    assert props.message_id == str(ORDER.id)
    assert props.priority == 4
    assert props.message_type == "order.created"
    assert props.headers == {"attempt": 1}
    assert orjson.loads(message.body)["version"] == 1


def test_a_stored_order_is_encoded_exactly_as_the_model() -> None:
    # As the relay reads it from PostgreSQL: asyncpg's UUID, the items as the jsonb codec gives.
    row = {
        "id": pgproto.UUID(str(ORDER.id)),
        "customer_id": ORDER.customer_id,
        "items": orjson.loads(orjson.dumps([i.model_dump() for i in ORDER.items])),
        "priority": ORDER.priority,
    }
    stored, model = messages.encode_stored(row), messages.encode(ORDER)
    assert stored.body == model.body
    assert stored.properties == model.properties


def test_items_json_holds_every_field_of_every_line() -> None:
    assert orjson.loads(messages.items_json(ORDER)) == [i.model_dump() for i in ORDER.items]


def test_new_ids_are_version_7_and_ordered_by_their_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [messages.new_id() for _ in range(1_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert {(i.version, i.variant) for i in ids} == {(7, uuid.RFC_4122)}
    stamps = [i.int >> 80 for i in ids]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] <= stamps[-1] <= after


def test_decode_round_trips() -> None:
    assert messages.decode(delivery(messages.encode(ORDER))) == ORDER


def test_message_id_names_the_body_in_any_spelling_of_its_uuid() -> None:
    assert messages.decode(raw(ORDER_BODY, message_id=str(ORDER.id).upper())) == ORDER
    assert messages.decode(raw(ORDER_BODY, message_id=ORDER.id.hex)) == ORDER


@pytest.mark.parametrize(
    ("frontier", "depth", "priority"),
    [("priority", 0, 9), ("priority", 3, 6), ("priority", 12, 0), ("fifo", 0, 0), ("lifo", 2, 0)],
)
def test_crawl_task_round_trips_with_priority_from_depth(
    frontier: str, depth: int, priority: int
) -> None:
    task = messages.CrawlTask(
        crawl_id=uuid.uuid4(),
        page_id=uuid.uuid4(),
        url="http://example.com/a",
        depth=depth,
        frontier=messages.Frontier(frontier),
    )
    message = messages.encode_task(task)
    props = message.properties
    assert props.message_type == "crawl.task"
    assert props.message_id == str(task.page_id)
    assert props.priority == priority
    assert props.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert messages.decode_task(delivery(message)) == task
    with pytest.raises(InvalidMessage, match=r"unknown message type 'crawl\.task'"):
        messages.decode(delivery(message))


@pytest.mark.parametrize(
    ("incoming", "reason"),
    [
        (raw(b"not json"), "body is not JSON"),
        (raw(b"\xff\xfe{}"), "not valid UTF-8"),
        (raw(b'{"version": 2}'), "unknown schema version 2"),
        (raw(b"[1, 2]"), "unknown schema version None"),
        (raw(b'{"version": 1, "id": "x"}'), "invalid order"),
        (
            raw(ORDER_BODY, type_="order.cancelled"),
            "unknown message type",
        ),
        (raw(ORDER_BODY, type_=None), "unknown message type"),
        (raw(ORDER_BODY), "message_id None is not the body's id"),
        (raw(ORDER_BODY, message_id="not-a-uuid"), "message_id 'not-a-uuid' is not the body's"),
        (raw(ORDER_BODY, message_id=str(uuid.uuid4())), "is not the body's id"),
    ],
)
def test_decode_names_why_a_message_is_poison(incoming: Delivery, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        messages.decode(incoming)


@pytest.mark.parametrize(
    ("headers", "attempt"),
    [
        (None, 1),
        ({"attempt": 3}, 3),
        ({"attempt": "3"}, 1),
        ({"attempt": 0}, 1),
        ({"attempt": True}, 1),
    ],
)
def test_attempt_header_is_read_defensively(headers: FieldTable | None, attempt: int) -> None:
    assert messages.attempt_of(raw(b"{}", headers=headers)) == attempt


@pytest.mark.parametrize(
    ("headers", "continues"),
    [
        (None, False),  # another client's first publish
        ({"attempt": 1}, False),  # the relay's
        ({"attempt": 2}, True),  # a retry
        ({"attempt": 1, "x-death": [{"queue": "orders.retry.100ms", "count": 1}]}, True),
        ({"x-death": []}, True),  # dead-lettered: whatever the attempt header says
    ],
)
def test_a_later_attempt_or_a_dead_lettered_message_continues_work(
    headers: FieldTable | None, continues: bool
) -> None:
    assert messages.continues(raw(b"{}", headers=headers)) is continues


@pytest.mark.parametrize(
    "message",
    [
        messages.encode(ORDER, attempt=2),
        aio_pika.Message(b"{}"),  # another client's bare message: no headers, no priority
        aio_pika.Message(
            b"x",
            content_encoding="gzip",
            correlation_id="c-9",
            app_id="shop",
            timestamp=1_700_000_000,
            priority=7,
            type="order.created",
        ),
    ],
)
def test_a_delivery_reads_what_aio_pikas_incoming_message_reads(
    message: aio_pika.Message | messages.Outgoing,
) -> None:
    frames = delivered(message)
    ours, theirs = Delivery(frames), aio_pika.IncomingMessage(frames, no_ack=True)
    read = [name for name, v in vars(messages.Received).items() if isinstance(v, property)]
    assert len(read) == 10
    for name in read:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.delivery_tag, ours.redelivered) == (theirs.delivery_tag, theirs.redelivered)


def test_forward_keeps_priority_and_identity_and_replaces_headers() -> None:
    incoming = delivery(messages.encode(ORDER, attempt=2))
    copy = messages.forward(incoming, {"attempt": 3, "error-type": "X"})
    assert copy.priority == 4
    assert copy.message_id == str(ORDER.id)
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert copy.headers == {"attempt": 3, "error-type": "X"}
    assert copy.body == incoming.body


def test_forward_leaves_out_the_headers_it_is_told_to_drop() -> None:
    headers = {"attempt": 2, "error-type": "X", "CC": ["order.created.4"], "keep": 1}
    incoming = aio_pika.Message(b"{}", headers=headers, priority=4)
    copy = messages.forward(incoming, {"attempt": 1}, drop=("error-type", "CC"))
    assert copy.headers == {"attempt": 1, "keep": 1}


def test_topology_binds_every_queue_and_uses_classic_priority_queue() -> None:
    bound = {b.queue.name for b in topology.CLASSIC.bindings}
    assert bound == {q.name for q in topology.CLASSIC.queues}
    assert topology.WORK.arguments["x-max-priority"] == 9
    assert all(q.arguments["x-queue-type"] == "classic" for q in topology.CLASSIC.queues)


@pytest.mark.parametrize(
    ("lane", "exchange", "routing_key"),
    [
        (topology.CLASSIC.orders, "orders", "order.created"),
        (topology.CLASSIC.crawls, "crawls", "crawl.task"),
    ],
)
def test_each_retry_queue_dead_letters_back_to_its_lane(
    lane: topology.Lane, exchange: str, routing_key: str
) -> None:
    assert [q.name for q in lane.work] == [f"{exchange}.work"]
    assert lane.work[0].arguments["x-dead-letter-exchange"] == f"{exchange}.dead"
    for delay, queue in zip(topology.RETRY_DELAYS_MS, lane.retry_queues, strict=True):
        assert queue.arguments["x-message-ttl"] == delay
        assert queue.arguments["x-dead-letter-exchange"] == exchange
        assert queue.arguments["x-dead-letter-routing-key"] == routing_key
        assert queue.name == f"{exchange}.retry.{topology.delay_name(delay)}"


@pytest.mark.parametrize(
    ("delay", "level"),
    [(0, 100), (150, 100), (999, 500), (1_000, 1_000), (4_000, 2_000), (10**9, 3_600_000)],
)
def test_retry_level_rounds_down_to_a_declared_delay(delay: float, level: int) -> None:
    assert topology.retry_level(delay) == level


def test_the_quorum_kind_has_a_quorum_queue_per_priority_the_highest_first() -> None:
    orders = topology.QUORUM.orders
    assert [b.priorities for b in orders.bands] == [range(p, p + 1) for p in range(9, -1, -1)]
    assert [b.queue.name for b in orders.bands][:2] == [
        "orders.quorum.work.9",
        "orders.quorum.work.8",
    ]
    for band in orders.bands:
        assert band.routing_key == f"order.created.{band.priorities[0]}"
        assert band.queue.arguments == {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "orders.dead",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": topology.DELIVERY_LIMIT,
        }
    assert orders.band(7).queue.name == "orders.quorum.work.7"
    assert orders.band(None) is orders.band(0)  # the contract's default priority
    assert orders.band(42) is orders.band(9)


def test_the_quorum_kind_routes_the_contracts_key_and_retries_by_band() -> None:
    orders = topology.QUORUM.orders
    keys = {(b.exchange.name, b.routing_key): b.queue.name for b in orders.bindings}
    assert keys[("orders", "order.created")] == "orders.quorum.work.0"
    assert keys[("orders", "order.created.9")] == "orders.quorum.work.9"
    for delay, queue in zip(topology.RETRY_DELAYS_MS, orders.retry_queues, strict=True):
        # No dead-letter routing key: back with the routing keys it came with, CC included.
        assert "x-dead-letter-routing-key" not in queue.arguments
        assert queue.arguments["x-dead-letter-exchange"] == "orders"
        assert queue.arguments["x-message-ttl"] == delay
        assert queue.arguments["x-dead-letter-strategy"] == "at-least-once"
    # Listing dead letters returns them; that must never drop one.
    assert orders.dead_letters.arguments == {"x-queue-type": "quorum", "x-delivery-limit": -1}


def test_the_kinds_share_exchanges_and_never_a_queue_name() -> None:
    classic, quorum = topology.CLASSIC, topology.QUORUM
    assert classic.exchanges == quorum.exchanges
    assert not {q.name for q in classic.queues} & {q.name for q in quorum.queues}
    read = re.compile(topology.PERMISSIONS["consumer"].read)
    assert all(read.fullmatch(q.name) for t in (classic, quorum) for q in t.orders.work)
    assert topology.of("quorum") is quorum
