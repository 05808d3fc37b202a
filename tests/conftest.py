"""One real RabbitMQ and one real PostgreSQL for the whole session.

``RABBITMQ_URL`` / ``DATABASE_URL`` name running services (``.ci/run`` sets them); without them,
testcontainers starts both. With neither, the session fails: integration tests never skip.

``make test`` runs two pytest-xdist workers with ``--dist loadgroup``. Tests that share the one
vhost and database (the integration and unit tests) stay on one worker, in order; the fault
suite (nodes of its own), the deploy tests (a Docker engine of their own) and the benchmarks'
smoke forms (vhosts and databases of their own) are groups apart, run beside them.
"""

import os
from collections.abc import Iterator

import pytest

APART = ("tests/faults/", "tests/deploy/test_stack.py", "tests/bench/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = next((part for part in APART if item.nodeid.startswith(part)), "shared")
        item.add_marker(pytest.mark.xdist_group(group))


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
