"""Services that name several RabbitMQ nodes in ``RABBITMQ_URL`` reach one that answers."""

import logging

import pytest
from yarl import URL

from shared import amqp, hosts
from testbed.processes import free_port


def _nodes(rabbitmq_url: str, *ports: int) -> str:
    """``rabbitmq_url`` with the hosts 127.0.0.1:<port> for each port (0: the real broker's)."""
    real = URL(rabbitmq_url)
    listed = ",".join(f"{real.host}:{port or real.port}" for port in ports)
    bare = f"amqp://{real.raw_user}@{listed}{real.raw_path}"
    return hosts.with_password(bare, real.password or "")


async def test_a_url_of_several_nodes_connects_to_one_that_answers(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    down = free_port()  # nothing listens there
    url = _nodes(rabbitmq_url, down, 0)
    monkeypatch.setattr(amqp.random, "randrange", lambda n: 0)  # the node that is down first
    with caplog.at_level(logging.WARNING, logger="shared.amqp"):
        async with await amqp.connect(url, "test") as connection:
            assert connection.url.port == URL(rabbitmq_url).port
    [skipped] = [r for r in caplog.records if getattr(r, "event", None) == "node_unavailable"]
    assert skipped.event_fields["node"] == hosts.redact(hosts.each(url)[0])
    assert "***" in skipped.event_fields["node"]


async def test_when_no_node_answers_the_last_one_s_error_is_raised(rabbitmq_url: str) -> None:
    url = _nodes(rabbitmq_url, free_port(), free_port())
    with pytest.raises(ConnectionError):
        await amqp.connect(url, "test")
