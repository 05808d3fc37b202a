"""One real RabbitMQ and one real PostgreSQL for the whole session.

``RABBITMQ_URL`` / ``DATABASE_URL`` name running services (``.ci/run`` sets them); without them,
testcontainers starts both. With neither, the session fails: integration tests never skip.

``make test`` runs the tests on pytest-xdist's workers, grouped by what they share
(``tests/xdist_private.py``).
"""

import os
from collections.abc import Iterator

import pytest
from xdist.remote import Producer

from tests.xdist_private import ByGroup


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> ByGroup:
    return ByGroup(config, log)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    if url := os.environ.get("RABBITMQ_URL"):
        yield url
        return
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:4.1-management") as broker:
        host, port = broker.get_container_host_ip(), broker.get_exposed_port(broker.port)
        yield f"amqp://guest:guest@{host}:{port}/"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:17-alpine", driver=None) as database:
        yield database.get_connection_url()
