"""``amqp.reconnecting``, the one reconnect loop of the consumer, the relay and the backlog."""

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from shared import amqp


async def test_pauses_double_up_to_the_cap_and_start_again_once_connected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(amqp, "RECONNECT_FIRST", 0.01)
    monkeypatch.setattr(amqp, "RECONNECT_CAP", 0.04)
    stop = asyncio.Event()
    plan = ["fail", "fail", "fail", "fail", "connect", "fail", "stop"]

    async def session(connected: Callable[[], None]) -> None:
        step = plan.pop(0)
        if step == "connect":
            connected()
        if step == "stop":
            stop.set()
            return
        raise ConnectionError(step)

    with caplog.at_level(logging.WARNING, logger="shared.amqp"):
        await asyncio.wait_for(amqp.reconnecting(session, stop, "test"), 5)
    logged = [r.event_fields for r in caplog.records]  # type: ignore[attr-defined]
    assert [f["who"] for f in logged] == ["test"] * 6
    # Doubling to the cap; once connected, from the first pause again.
    assert [f["retry_in"] for f in logged] == [0.01, 0.02, 0.04, 0.04, 0.01, 0.02]


async def test_stop_ends_a_pause_at_once() -> None:
    stop = asyncio.Event()

    async def session(connected: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(0.05, stop.set)
        raise ConnectionError("down")

    started = time.monotonic()
    await asyncio.wait_for(amqp.reconnecting(session, stop, "test"), 5)
    assert time.monotonic() - started < amqp.RECONNECT_FIRST
