"""``make faults``: every scenario at full length, then the table (``--short`` for the CI form).

The single-node scenarios run on one RabbitMQ node with ``--kind``'s queues; the cluster's on
three nodes in one cluster, with quorum queues (the kind a cluster replicates); the database's
failovers on a primary and two standbys under Patroni, with one RabbitMQ node."""

import argparse
import asyncio
import os
import platform
import sys

from shared import topology
from testbed.netns import run
from testbed.patroni import PostgresCluster
from tests.faults.harness import (
    CLUSTER_SCENARIOS,
    DATABASE_SCENARIOS,
    FULL,
    SCENARIOS,
    SHORT,
    Result,
    Scenario,
    run_scenario,
    table,
)
from tests.faults.nodes import PostgresNode, RabbitCluster, RabbitNode


async def main(names: list[str], short: bool, kind: topology.Kind) -> int:
    single = [s for s in SCENARIOS if not names or s.name in names]
    clustered = [s for s in CLUSTER_SCENARIOS if not names or s.name in names]
    failing_over = [s for s in DATABASE_SCENARIOS if not names or s.name in names]
    timing = SHORT if short else FULL
    broker, database = RabbitNode(), PostgresNode()
    await asyncio.gather(broker.start(), database.start())
    results: list[Result] = []

    async def each(
        scenarios: list[Scenario],
        on: RabbitNode | RabbitCluster,
        k: topology.Kind,
        store: PostgresNode | PostgresCluster = database,
    ) -> None:
        for scenario in scenarios:
            print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
            results.append(await run_scenario(scenario, on, store, timing, kind=k))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)

    try:
        await each(single, broker, kind)
        rabbit = (await broker.ctl("eval", "rabbit_misc:version().")).strip().strip('"')
        if clustered:
            cluster = RabbitCluster()
            try:
                await cluster.start()
                await each(clustered, cluster, topology.Kind.QUORUM)
            finally:
                await cluster.stop()
        if failing_over:
            primary_and_standby = PostgresCluster()
            try:
                await primary_and_standby.start()
                await each(failing_over, broker, kind, primary_and_standby)
            finally:
                await primary_and_standby.stop()
    finally:
        await asyncio.gather(broker.stop(), database.stop())
    postgres = (await run("psql", "--version")).split()[2]
    print(
        f"\n{'short' if short else 'full'} run, {kind} queues (cluster-*: quorum, three nodes),"
        f" on {platform.node()}:"
        f" {os.cpu_count()} cores,"
        f" Python {platform.python_version()}, RabbitMQ {rabbit}, PostgreSQL {postgres}\n"
    )
    print(table(results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("scenarios", nargs="*", help="run only these")
    parser.add_argument("--short", action="store_true", help="the shorter form CI runs")
    parser.add_argument(
        "--kind", choices=[k.value for k in topology.Kind], default="classic", help="QUEUE_KIND"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.scenarios, args.short, topology.Kind(args.kind))))
