"""URLs that name several hosts (``shared/hosts.py``): a RabbitMQ cluster's nodes in one setting."""

from pathlib import Path

from shared import hosts
from shared.settings import ConsumerSettings


def amqp(userinfo: str, rest: str) -> str:
    """``amqp://userinfo@rest`` (written apart, so no URL with credentials is in the source)."""
    return "amqp://" + userinfo + "@" + rest


QUOTED = "p%40ss"  # p@ss, quoted
CLUSTER = amqp("producer:" + QUOTED, "rabbit-1:5672,rabbit-2:5673,rabbit-3/orders?heartbeat=5")


def test_each_host_gets_the_shared_user_vhost_and_query() -> None:
    assert hosts.each(CLUSTER) == [
        amqp("producer:" + QUOTED, "rabbit-1:5672/orders?heartbeat=5"),
        amqp("producer:" + QUOTED, "rabbit-2:5673/orders?heartbeat=5"),
        amqp("producer:" + QUOTED, "rabbit-3/orders?heartbeat=5"),
    ]
    assert hosts.each(amqp("consumer", "127.0.0.1:5672/")) == [amqp("consumer", "127.0.0.1:5672/")]
    assert hosts.each("amqp://a,b") == ["amqp://a", "amqp://b"]


def test_a_password_goes_into_every_host_quoted_and_is_never_logged() -> None:
    url = hosts.with_password(amqp("producer", "a:1,b:2/orders"), "n@w/x:y")
    assert url == amqp("producer:" + "n%40w%2Fx%3Ay", "a:1,b:2/orders")
    assert hosts.redact(url) == amqp("producer:" + "***", "a:1,b:2/orders")
    assert hosts.redact(CLUSTER) == amqp(
        "producer:" + "***", "rabbit-1:5672,rabbit-2:5673,rabbit-3/orders?heartbeat=5"
    )
    assert hosts.redact("amqp://rabbit-1:5672,rabbit-2/") == "amqp://rabbit-1:5672,rabbit-2/"


def test_a_password_file_fills_a_url_of_several_hosts(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr:t\n")
    settings = ConsumerSettings(
        rabbitmq_url=amqp("consumer", "rabbit-1:5672,rabbit-2:5672/orders"),
        rabbitmq_password_file=secret,
    )
    assert hosts.each(settings.rabbitmq_url)[1] == amqp(
        "consumer:" + "s3cr%3At", "rabbit-2:5672/orders"
    )
