"""The short form of `make faults`: every scenario, fewer orders, the same pass criterion."""

import asyncio
from collections.abc import Iterator

import pytest

from shared import topology
from testbed.patroni import PostgresCluster
from tests.faults.harness import (
    CLUSTER_SCENARIOS,
    DATABASE_SCENARIOS,
    SCENARIOS,
    SHORT,
    Result,
    Scenario,
    run_scenario,
    table,
)
from tests.faults.nodes import PostgresNode, RabbitCluster, RabbitNode


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[RabbitNode, PostgresNode]]:
    """A broker and a database of our own, started once for all scenarios, stopped at the end."""
    broker, database = RabbitNode(), PostgresNode()
    asyncio.run(_start(broker, database))
    yield broker, database
    asyncio.run(_stop(broker, database))


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes of our own in one cluster, for the cluster's scenarios."""
    nodes = RabbitCluster()
    asyncio.run(nodes.start())
    yield nodes
    asyncio.run(nodes.stop())


@pytest.fixture(scope="module")
def primary_and_standby() -> Iterator[PostgresCluster]:
    """A PostgreSQL primary and synchronous standby under Patroni, for the failover scenarios."""
    database = PostgresCluster()
    asyncio.run(database.start())
    yield database
    asyncio.run(database.stop())


async def _start(broker: RabbitNode, database: PostgresNode) -> None:
    await asyncio.gather(broker.start(), database.start())


async def _stop(broker: RabbitNode, database: PostgresNode) -> None:
    await asyncio.gather(broker.stop(), database.stop())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_no_order_is_lost_or_applied_twice_under(
    scenario: Scenario, nodes: tuple[RabbitNode, PostgresNode]
) -> None:
    _passed(scenario, await run_scenario(scenario, *nodes, SHORT))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", CLUSTER_SCENARIOS, ids=[s.name for s in CLUSTER_SCENARIOS])
async def test_on_a_cluster_no_order_is_lost_or_applied_twice_under(
    scenario: Scenario, cluster: RabbitCluster, nodes: tuple[RabbitNode, PostgresNode]
) -> None:
    result = await run_scenario(scenario, cluster, nodes[1], SHORT, kind=topology.Kind.QUORUM)
    _passed(scenario, result)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", DATABASE_SCENARIOS, ids=[s.name for s in DATABASE_SCENARIOS])
async def test_when_the_database_fails_over_no_order_is_lost_or_applied_twice_under(
    scenario: Scenario,
    primary_and_standby: PostgresCluster,
    nodes: tuple[RabbitNode, PostgresNode],
) -> None:
    _passed(scenario, await run_scenario(scenario, nodes[0], primary_and_standby, SHORT))


def _passed(scenario: Scenario, result: Result) -> None:
    print("\n" + table([result]))
    assert result.ok > 0
    assert result.lost == 0, table([result])
    assert result.duplicated == 0, table([result])
    assert result.stuck == 0, table([result])
    assert result.unexpected == 0, table([result])
    assert result.untold == 0, table([result])
    assert result.drained_s <= 60, table([result])
    assert result.fault_observed, f"no {scenario.evidence} observed: the fault was not real"
