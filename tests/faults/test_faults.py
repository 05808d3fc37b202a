"""The short form of `make faults`: every scenario, fewer orders, the same pass criterion."""

import asyncio
from collections.abc import Iterator

import pytest

from tests.faults.harness import SCENARIOS, SHORT, Scenario, run_scenario, table
from tests.faults.nodes import PostgresNode, RabbitNode


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[RabbitNode, PostgresNode]]:
    """A broker and a database of our own, started once for all scenarios, stopped at the end."""
    broker, database = RabbitNode(), PostgresNode()
    asyncio.run(_start(broker, database))
    yield broker, database
    asyncio.run(_stop(broker, database))


async def _start(broker: RabbitNode, database: PostgresNode) -> None:
    await asyncio.gather(broker.start(), database.start())


async def _stop(broker: RabbitNode, database: PostgresNode) -> None:
    await asyncio.gather(broker.stop(), database.stop())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_no_order_is_lost_or_applied_twice_under(
    scenario: Scenario, nodes: tuple[RabbitNode, PostgresNode]
) -> None:
    result = await run_scenario(scenario, *nodes, SHORT)
    print("\n" + table([result]))
    assert result.ok > 0
    assert result.lost == 0, table([result])
    assert result.duplicated == 0, table([result])
    assert result.stuck == 0, table([result])
    assert result.unexpected == 0, table([result])
    assert result.drained_s <= 60, table([result])
    assert result.fault_observed, f"no {scenario.evidence} observed: the fault was not real"
