"""The message contract (docs/messages.md): pydantic models and their AMQP encoding.

Any AMQP client can publish an order: exchange ``orders``, routing key ``order.created``,
``type=order.created``, ``content_type=application/json``, ``delivery_mode=2``,
``message_id`` = the order id, ``priority`` = the order priority, and a JSON body
matching ``OrderMessage``. Crawl tasks (``crawl.task`` on exchange ``crawls``, body
``CrawlTask``) and webhook deliveries (``webhook.delivery`` on exchange ``webhooks``, body
``WebhookTask``) travel the same way; only the outbox relay publishes them.
"""

import os
import time
import unicodedata
from collections.abc import Collection, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple, Protocol, TypeVar
from uuid import UUID

import orjson
from aio_pika import DeliveryMode, Message
from aio_pika.abc import HeadersType
from aiormq import spec
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from shared.errors import InvalidMessage

MESSAGE_TYPE = "order.created"
CRAWL_MESSAGE_TYPE = "crawl.task"
WEBHOOK_MESSAGE_TYPE = "webhook.delivery"
CONTENT_TYPE = "application/json"
SCHEMA_VERSION: Literal[1] = 1
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 0  # an order's, and a message's without one

# Application headers. The attempt count travels here, never in x-death.
ATTEMPT = "attempt"
ERROR_TYPE = "error-type"
ERROR_MESSAGE = "error-message"
FIRST_FAILURE_AT = "first-failure-at"
LAST_FAILURE_AT = "last-failure-at"


def new_id() -> UUID:
    """A new order or crawl id: a UUID of version 7 (RFC 9562). Its first 48 bits are the time in
    milliseconds and 74 of the rest are random, so ids made one after another are neighbours in
    a primary key's index (random ids, version 4, cost the database more per insert). An id tells
    when it was made, as the order's ``created_at`` does; its random bits keep it unguessable.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return UUID(int=value & ~(0xF << 76 | 0x3 << 62) | 0x7 << 76 | 0x2 << 62)


def _printable(value: str) -> str:
    """Refuse control characters (NUL too) and lone surrogates: PostgreSQL cannot store them."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"must not contain the character U+{ord(char):04X}")
    return value


Sku = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
CustomerId = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_printable)
]
Quantity = Annotated[int, Field(ge=1, le=10_000)]
Priority = Annotated[int, Field(ge=0, le=MAX_PRIORITY, description="0-9, higher is more urgent")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Item(_Strict):
    """One order line."""

    sku: Sku
    quantity: Quantity


class NewOrder(_Strict):
    """What a client submits."""

    customer_id: CustomerId
    items: Annotated[list[Item], Field(min_length=1, max_length=100)]
    priority: Priority = DEFAULT_PRIORITY


class OrderRequest(NewOrder):
    """What a client submits over HTTP: an order, and where to send its final event."""

    callback_url: Annotated[
        Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None,
        Field(
            description="sent the order's final event, signed (docs/notifications.md)",
            json_schema_extra={"format": "uri"},
        ),
    ] = None


class OrderMessage(NewOrder):
    """The body of an ``order.created`` message."""

    version: Literal[1] = SCHEMA_VERSION
    id: Annotated[UUID, Field(strict=False)]


class Frontier(StrEnum):
    """The order in which a crawl visits the pages it finds (docs/crawler.md)."""

    FIFO = "fifo"  # breadth-first
    LIFO = "lifo"  # depth-first within each consumer's prefetch window
    PRIORITY = "priority"  # shallow pages first, by AMQP priority


class CrawlTask(_Strict):
    """The body of a ``crawl.task`` message: fetch one page of a crawl."""

    version: Literal[1] = SCHEMA_VERSION
    crawl_id: Annotated[UUID, Field(strict=False)]
    page_id: Annotated[UUID, Field(strict=False)]
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    depth: Annotated[int, Field(ge=0)]
    frontier: Annotated[Frontier, Field(strict=False)]

    @property
    def priority(self) -> int:
        """Shallow pages first for a ``priority`` crawl; one level for the others."""
        if self.frontier is Frontier.PRIORITY:
            return max(0, MAX_PRIORITY - self.depth)
        return 0


class WebhookTask(_Strict):
    """The body of a ``webhook.delivery`` message: send one stored delivery (its payload, URL and
    secret stay in the database: the message names it)."""

    version: Literal[1] = SCHEMA_VERSION
    delivery_id: Annotated[UUID, Field(strict=False)]


def items_json(order: NewOrder) -> str:
    """An order's lines as the JSON text PostgreSQL stores in ``orders.items``."""
    return orjson.dumps([{"sku": i.sku, "quantity": i.quantity} for i in order.items]).decode()


class Outgoing(NamedTuple):
    """A message to publish: what ``aio_pika.Message`` carries to the wire, without its cost."""

    body: bytes
    properties: spec.Basic.Properties


def encode(order: OrderMessage, attempt: int = 1) -> Outgoing:
    """An order as a persistent AMQP message."""
    body = orjson.dumps(order.model_dump(mode="json"))
    return _message(body, str(order.id), order.priority, MESSAGE_TYPE, attempt)


def encode_stored(order: Mapping[str, Any]) -> Outgoing:
    """An order row as the producer stored it (validated when it was accepted), encoded exactly
    as ``encode`` would, without validating it again: the outbox relay's hot path."""
    body = {
        "customer_id": order["customer_id"],
        "items": order["items"],
        "priority": order["priority"],
        "version": SCHEMA_VERSION,
        "id": str(order["id"]),  # asyncpg's own UUID type, which orjson does not know
    }
    return _message(orjson.dumps(body), body["id"], order["priority"], MESSAGE_TYPE, 1)


def encode_task(task: CrawlTask, attempt: int = 1) -> Outgoing:
    """A crawl task as a persistent AMQP message; ``message_id`` is the page id."""
    body = orjson.dumps(task.model_dump(mode="json"))
    return _message(body, str(task.page_id), task.priority, CRAWL_MESSAGE_TYPE, attempt)


def encode_webhook(task: WebhookTask) -> Outgoing:
    """A webhook delivery as a persistent AMQP message; ``message_id`` is the delivery id."""
    body = orjson.dumps(task.model_dump(mode="json"))
    return _message(body, str(task.delivery_id), DEFAULT_PRIORITY, WEBHOOK_MESSAGE_TYPE, 1)


def _message(
    body: bytes, message_id: str, priority: int, message_type: str, attempt: int
) -> Outgoing:
    properties = spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id,
        priority=priority,
        message_type=message_type,
        headers={ATTEMPT: attempt},
    )
    return Outgoing(body, properties)


class Received(Protocol):
    """What the contract reads of a delivery: the consumer's ``Delivery`` or aio-pika's
    ``IncomingMessage`` (the dead-letter tools take messages with ``basic.get``)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> HeadersType: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def app_id(self) -> str | None: ...


def decode(message: Received) -> OrderMessage:
    """The order in a delivery, or ``InvalidMessage`` saying why it is not one."""
    order = _decode(message, MESSAGE_TYPE, OrderMessage, "order")
    _named_by_message_id(message, order.id)
    return order


def decode_task(message: Received) -> CrawlTask:
    """The crawl task in a delivery, or ``InvalidMessage`` saying why it is not one."""
    task = _decode(message, CRAWL_MESSAGE_TYPE, CrawlTask, "crawl task")
    _named_by_message_id(message, task.page_id)
    return task


def decode_webhook(message: Received) -> WebhookTask:
    """The webhook delivery a message names, or ``InvalidMessage`` saying why it names none."""
    task = _decode(message, WEBHOOK_MESSAGE_TYPE, WebhookTask, "webhook delivery")
    _named_by_message_id(message, task.delivery_id)
    return task


def _named_by_message_id(message: Received, body_id: UUID) -> None:
    """``message_id`` is the idempotency key of the effect, and the dead-letter tools find a
    message by it: it must name what the body does."""
    if order_id_of(message) != body_id:
        raise InvalidMessage(f"message_id {message.message_id!r} is not the body's id {body_id}")


_M = TypeVar("_M", bound=BaseModel)


def _decode(message: Received, message_type: str, model: type[_M], noun: str) -> _M:
    if message.type != message_type:
        raise InvalidMessage(f"unknown message type {message.type!r}")
    if message.content_type not in (None, CONTENT_TYPE):
        raise InvalidMessage(f"unsupported content type {message.content_type!r}")
    try:
        message.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not valid UTF-8: {exc}") from None
    try:
        data = orjson.loads(message.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != SCHEMA_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise InvalidMessage(f"unknown schema version {version!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid {noun}: {_summary(exc)}") from None


def attempt_of(message: Received) -> int:
    """The 1-based attempt a delivery stands for (1 when the header is absent or unreadable)."""
    value = (message.headers or {}).get(ATTEMPT)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def continues(message: Received) -> bool:
    """Whether a delivery continues work begun earlier: it says it is a later attempt, or it went
    through a retry or dead-letter queue (the broker's ``x-death``, which no publisher can leave
    off). Such a message may only continue work the database holds (docs/security.md)."""
    return attempt_of(message) > 1 or "x-death" in (message.headers or {})


def order_id_of(message: Received) -> UUID | None:
    """The order (or crawl page) a delivery names in ``message_id``, even when its body is
    unreadable."""
    try:
        return UUID(message.message_id or "")
    except ValueError:
        return None


def forward(message: Received, headers: Mapping[str, Any], drop: Collection[str] = ()) -> Message:
    """A persistent copy of a delivery, its priority kept, with some headers replaced and the
    ones named in ``drop`` left out."""
    kept = {k: v for k, v in (message.headers or {}).items() if k not in drop}
    merged: HeadersType = {**kept, **headers}
    return Message(
        message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        priority=message.priority,
        type=message.type,
        timestamp=message.timestamp,
        app_id=message.app_id,
        headers=merged,
    )


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )
