"""``python -m shared.setup``: what the services' own accounts may not do.

Run once per deployment and after each upgrade (compose's ``setup`` service, ``make dev``), with
the operator's broker account and the database owner. It declares the whole topology, migrates
the schema, and creates or updates each service's database role with exactly its privileges.
Every step is idempotent.

``--move`` (with ``QUEUE_KIND=quorum``) first moves the classic queues, and every message in
them, to quorum queues (shared/move.py): how a deployment goes from one kind to the other.
"""

import argparse
import asyncio
import logging
import sys

from shared import amqp, db, hosts, logs, topology
from shared.move import move
from shared.settings import SetupSettings

log = logging.getLogger(__name__)


async def run(settings: SetupSettings, moving: bool = False) -> None:
    if moving:
        await move(
            settings.rabbitmq_url,
            settings.queue_kind,
            settings.publish_timeout,
            settings.startup_timeout,
        )
    async with await amqp.connect(settings.rabbitmq_url, "setup") as connection:
        await topology.declare(await connection.channel(), settings.queue_kind)
    log.info("%s topology declared on %s", settings.queue_kind, hosts.redact(settings.rabbitmq_url))
    pool = await db.create_pool(settings.database_url, 2)
    try:
        await db.migrate(pool, settings.startup_timeout)
        for service, user, password in (
            ("producer", settings.producer_db_user, settings.producer_db_password),
            ("consumer", settings.consumer_db_user, settings.consumer_db_password),
        ):
            if user and password is not None:
                await db.grant(pool, service, user, password.get_secret_value())
                log.info("database role %s has the %s's privileges", user, service)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.setup", description=__doc__)
    parser.add_argument(
        "--move",
        action="store_true",
        help="move the classic queues and their messages to quorum ones first (QUEUE_KIND=quorum)",
    )
    args = parser.parse_args()
    settings = SetupSettings()
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings, args.move))
    except Exception as exc:
        log.error("setup failed: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
