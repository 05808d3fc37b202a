"""The benchmark harness, run tiny so it cannot rot: every phase runs and the table prints."""

import asyncio

import aio_pika
import pytest

from bench import baselines
from tests.bench.conftest import Smoke


def test_bench_smoke_prints_every_figure(smoke: Smoke) -> None:
    result = smoke("bench")
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    figures = [line.split(" | ")[0] for line in table[1:]]
    assert len(figures) == 39, result.stdout
    for figure in (
        "submit, c=16",
        "batch submit",
        "relay publish",
        "drain, 1 consumer",
        "drain, 2 consumers",
        "end to end at half load: p99",
        "priority 9 wait",
        "CPU per order, submit c=16: producer",
        "CPU per order, submit c=16: relay",
        "CPU per request, bare app (a)",
        "submit c=16: the ceiling of",
        "CPU per order, 1-consumer drain: consumer",
        "drain: the ceiling of",
        "CPU per order at half load: producer",
        "consumer peak RSS",
        "producer peak RSS",
        "relay peak RSS",
    ):
        assert any(figure in f for f in figures), figure
    assert "nan" not in result.stdout


async def test_raw_consume_baseline_alone_publishes_what_it_consumes(rabbitmq_url: str) -> None:
    """``--only raw_consume``: no publish phase ran before it, so it fills the queue itself."""
    async with asyncio.timeout(60):
        assert await baselines.consume(rabbitmq_url, 200) > 0


async def test_rounds_probe_gives_a_rate_and_leaves_no_queue(rabbitmq_url: str) -> None:
    """``--rounds``: a rate for rounds of a given size, and its queue deleted afterwards."""
    async with asyncio.timeout(60):
        assert await baselines.publish_rounds(rabbitmq_url, 4, 40) > 0
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(baselines.QUEUE + ".rounds", passive=True)
