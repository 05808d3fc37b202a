"""``make faults``: every scenario at full length, then the table (``--short`` for the CI form)."""

import argparse
import asyncio
import os
import platform
import sys

from shared import topology
from tests.faults.harness import FULL, SCENARIOS, SHORT, Result, run_scenario, table
from tests.faults.nodes import PostgresNode, RabbitNode, run


async def main(names: list[str], short: bool, kind: topology.Kind) -> int:
    chosen = [s for s in SCENARIOS if not names or s.name in names]
    broker, database = RabbitNode(), PostgresNode()
    await asyncio.gather(broker.start(), database.start())
    results: list[Result] = []
    try:
        for scenario in chosen:
            print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
            timing = SHORT if short else FULL
            results.append(await run_scenario(scenario, broker, database, timing, kind=kind))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        rabbit = (await broker.ctl("eval", "rabbit_misc:version().")).strip().strip('"')
    finally:
        await asyncio.gather(broker.stop(), database.stop())
    postgres = (await run("psql", "--version")).split()[2]
    print(
        f"\n{'short' if short else 'full'} run, {kind} queues, on {platform.node()}:"
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
