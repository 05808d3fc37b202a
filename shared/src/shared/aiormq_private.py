"""The one module that touches aiormq's private names, for the two hot paths of ``shared.amqp``.

Written against aiormq 7.2.4 and pamqp 4.0.1 (``shared/pyproject.toml`` keeps aiormq to 7.2.x).
``usable`` checks, on the first channel a process opens, that every name used here exists; where
one does not (a newer aiormq), it logs one warning and ``shared.amqp`` takes aiormq's public
``basic_consume`` and ``basic_publish`` instead, slower but the same in effect
(tests/integration/test_publishing.py runs both ways).

- ``read_in_reader``: a consumer's deliveries are handed over from the channel's reader, where
  aiormq's ``_on_deliver_frame`` makes a task for each (the task and its done callback were 12% of
  a consumer's CPU).
- ``write_all``: a whole round of publishes goes to the socket as one write, registered for
  confirms as ``Channel.basic_publish`` registers one, where aiormq's takes the channel's lock, a
  task and a write per message (half the relay's CPU per order). docs/performance-history.md has
  the figures.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import version
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from shared.messages import Outgoing

log = logging.getLogger(__name__)

NEEDED = (
    # read_in_reader
    "_Channel__get_content_header",
    "_read_content",
    "_on_deliver_frame",
    # write_all
    "lock",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "max_content_size",
    "number",
)

_checked: bool | None = None


def usable(channel: aiormq.Channel) -> bool:
    """Whether this aiormq has every private name used here; checked once per process."""
    global _checked
    if _checked is None:
        missing = [name for name in NEEDED if not hasattr(channel, name)]
        if missing:
            log.warning(
                "aiormq %s lacks %s: consuming and publishing take aiormq's public paths, "
                "which cost more CPU per message",
                version("aiormq"),
                ", ".join(missing),
            )
        _checked = not missing
    return _checked


def read_in_reader(
    channel: aiormq.Channel,
    receive: Callable[[DeliveredMessage], None],
    failed: Callable[[Exception], None],
) -> None:
    """Hand each delivery of ``channel`` to ``receive`` from its reader, as it is read.

    The frames are read with aiormq's own methods, as its ``_on_deliver_frame`` reads them. An
    exception from ``receive`` goes to ``failed``, which must not block either: the reader must
    go on reading, for the broker's reply to a close."""
    read_header = channel._Channel__get_content_header  # type: ignore[attr-defined]

    async def on_deliver(frame: spec.Basic.Deliver) -> None:
        delivered = await channel._read_content(frame, await read_header())
        try:
            receive(delivered)
        except Exception as exc:
            failed(exc)

    channel._on_deliver_frame = on_deliver  # type: ignore[method-assign]


async def write_all(
    channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing], routing_key: str
) -> list["asyncio.Future[Any]"]:
    """Write ``messages`` to the socket at once; returns each one's confirm future.

    Each message's delivery tag, confirm future and message id are registered as aiormq's
    ``basic_publish`` registers them, so acks, nacks, returns and a closing channel settle these
    futures as they would its. A message without ``message_id`` goes without ``mandatory``: a
    return is matched to its message by id. If the write never reaches the queue (cancelled, or
    the channel closing), the bookkeeping is undone, as ``basic_publish`` undoes it, so the
    channel's delivery tags stay in step with the broker's."""
    confirms: list[asyncio.Future[Any]] = []
    frames: list[Any] = []
    async with channel.lock:  # delivery tags in the order the broker sees the messages
        first = channel.delivery_tag + 1
        try:
            for message in messages:
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                confirm = channel.create_future()
                channel.confirmations[tag] = confirm
                confirms.append(confirm)
                if message_id := message.properties.message_id:
                    channel.message_id_delivery_tag[message_id] = tag
                frames += (
                    spec.Basic.Publish(
                        exchange=exchange, routing_key=routing_key, mandatory=bool(message_id)
                    ),
                    ContentHeader(properties=message.properties, body_size=len(message.body)),
                    *_split(message.body, channel.max_content_size),
                )
            await channel.write_queue.put(ChannelFrame.marshall(channel.number, frames))
        except BaseException:
            _undo(channel, first, messages, confirms)
            raise
    for tag, (message, confirm) in enumerate(zip(messages, confirms, strict=True), first):
        if message_id := message.properties.message_id:
            confirm.add_done_callback(partial(_forget, channel, message_id, tag))
    return confirms


def _undo(
    channel: aiormq.Channel,
    first: int,
    messages: Sequence[Outgoing],
    confirms: list["asyncio.Future[Any]"],
) -> None:
    """The broker never saw these publishes: give their tags back and forget them."""
    for tag, (message, confirm) in enumerate(zip(messages, confirms, strict=False), first):
        channel.confirmations.pop(tag, None)
        if message_id := message.properties.message_id:
            _forget(channel, message_id, tag, confirm)
        confirm.cancel()
    channel.delivery_tag = first - 1


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: "asyncio.Future[Any]") -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def _split(body: bytes, size: int) -> list[ContentBody]:
    return [ContentBody(body[i : i + size]) for i in range(0, len(body), size)]
