"""``make dev``: the stack as local processes, the no-Docker twin of ``docker compose up``.

Runs ``python -m producer``, ``python -m producer relay`` and ``CONSUMERS`` (default 2)
``python -m consumer`` processes against ``RABBITMQ_URL`` / ``DATABASE_URL`` (default: the local
services), creating the database if it is missing and running ``python -m shared.setup`` first.
Like compose, each service gets its own broker user (when RabbitMQ is local, made with
rabbitmqctl) and database role with least privilege; they are removed when it stops. Their
output is interleaved, one prefix per process. ``API_KEYS`` defaults to a fresh key, printed at
start. Ctrl-C or SIGTERM stops them all gracefully: consumers finish and ack their in-flight
orders first.
"""

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import sys

import asyncpg
from yarl import URL

from shared.topology import PERMISSIONS

DEFAULTS = {
    "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/orders",
    "DEMO_CATALOGUE": "true",
    "LOG_FORMAT": "text",
}
METRICS_PORT = 9100  # the relay's metrics; consumer i serves its own on METRICS_PORT + i
GRACE = 30.0  # seconds before a process that ignores SIGTERM is killed


async def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if the server does not have it yet."""
    name = URL(url).path.lstrip("/") or "postgres"
    admin = await asyncpg.connect(str(URL(url).with_path("/postgres")))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
            print(f"dev        | created database {name}", flush=True)
    finally:
        await admin.close()


# What manages the broker behind RABBITMQ_URL: the machine's rabbitmqctl unless RABBITMQCTL says
# otherwise (a node of scripts/rabbitmq4.sh: "scripts/rabbitmq4.sh ctl -n NAME@localhost").
RABBITMQCTL = shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))


async def _ctl(*args: str) -> int:
    ctl = await asyncio.create_subprocess_exec(
        *RABBITMQCTL,
        "-q",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await ctl.wait()


async def service_accounts(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each service's own broker user and database role, with the permissions compose gives
    them (shared/topology.py, shared/db.py); setup makes the roles. Without rabbitmqctl the
    services share RABBITMQ_URL's account."""
    tag = f"dev-{os.getpid()}"
    accounts: dict[str, dict[str, str]] = {}
    amqp, database = URL(env["RABBITMQ_URL"]), URL(env["DATABASE_URL"])
    local_broker = shutil.which(RABBITMQCTL[0]) and amqp.host in ("127.0.0.1", "localhost")
    for role in ("producer", "consumer"):
        db_user, db_password = f"orders_{role}_{tag.replace('-', '_')}", secrets.token_hex(16)
        accounts[role] = {
            "DATABASE_URL": str(database.with_user(db_user).with_password(db_password))
        }
        if local_broker:
            user, password = f"orders-{role}-{tag}", secrets.token_hex(16)
            p = PERMISSIONS[role]
            vhost = amqp.path[1:] or "/"
            if await _ctl("add_user", user, password) or await _ctl(
                "set_permissions", "-p", vhost, user, p.configure, p.write, p.read
            ):
                raise RuntimeError(f"rabbitmqctl could not make the broker user {user}")
            accounts[role]["RABBITMQ_URL"] = str(amqp.with_user(user).with_password(password))
    if not local_broker:
        print("dev        | no local rabbitmqctl: the services share RABBITMQ_URL's account")
    return accounts


async def remove_accounts(env: dict[str, str], accounts: dict[str, dict[str, str]]) -> None:
    for account in accounts.values():
        if "RABBITMQ_URL" in account:
            await _ctl("delete_user", URL(account["RABBITMQ_URL"]).user or "")
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        for account in accounts.values():
            role = URL(account["DATABASE_URL"]).user
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute(f'DROP OWNED BY "{role}"')
                await conn.execute(f'DROP ROLE "{role}"')
    finally:
        await conn.close()


async def relay(name: str, stream: asyncio.StreamReader) -> None:
    prefix = f"{name:<10} | ".encode()
    while line := await stream.readline():
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.flush()


async def start(
    name: str, module: str, env: dict[str, str], *args: str
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    print(f"dev        | started {name} pid {process.pid}", flush=True)
    return process


async def main() -> int:
    env = {**DEFAULTS, **os.environ, "PYTHONUNBUFFERED": "1"}
    if not env.get("API_KEYS"):
        env["API_KEYS"] = f"dev:{secrets.token_urlsafe(24)}"
        print(f"dev        | API key for this run: {env['API_KEYS'][4:]}", flush=True)
    consumers = int(env.get("CONSUMERS", "2"))
    await ensure_database(env["DATABASE_URL"])
    accounts = await service_accounts(env)
    try:
        return await run(env, consumers, accounts)
    finally:
        await remove_accounts(env, accounts)


async def run(env: dict[str, str], consumers: int, accounts: dict[str, dict[str, str]]) -> int:
    roles = {}  # setup makes each service's database role from its URL
    for role, account in accounts.items():
        url = URL(account["DATABASE_URL"])
        roles |= {
            f"{role.upper()}_DB_USER": url.user or "",
            f"{role.upper()}_DB_PASSWORD": url.password or "",
        }
    setup = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.setup", env={**env, **roles}
    )
    if await setup.wait():
        return 1

    producer = {**env, **accounts["producer"]}
    # As compose runs them: the API stores orders, a relay process of its own publishes them.
    named = {
        "producer": await start("producer", "producer", {**producer, "RELAY_INLINE": "false"}),
        "relay": await start("relay", "producer", {**producer, "PORT": str(METRICS_PORT)}, "relay"),
    }
    for i in range(1, consumers + 1):
        name = f"consumer-{i}"
        metrics = {"CONSUMER_NAME": name, "METRICS_PORT": str(METRICS_PORT + i)}
        named[name] = await start(name, "consumer", {**env, **accounts["consumer"], **metrics})
    relays = [asyncio.create_task(relay(n, p.stdout)) for n, p in named.items() if p.stdout]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def watch(name: str, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if not stop.is_set():
            print(f"dev        | {name} exited with status {code}", flush=True)

    watchers = [asyncio.create_task(watch(n, p)) for n, p in named.items()]
    await stop.wait()
    print("dev        | stopping", flush=True)
    for process in named.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    _, late = await asyncio.wait(watchers, timeout=GRACE)
    for process in named.values():
        if process.returncode is None:
            process.kill()
    await asyncio.gather(*watchers, *relays)
    print("dev        | stopped", flush=True)
    return 1 if late else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
