"""A RabbitMQ node and a PostgreSQL server of our own, on free ports, for tests that break them.

The machine's own broker (5672) and database (5432) are shared and never touched; these are
started from the same installed binaries (see ../shared/RELIABILITY.md) in temporary directories.
"""

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from testbed.processes import free_port


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a command; its output, or an error naming the command."""
    process = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        raise RuntimeError(f"{' '.join(args)} timed out after {timeout}s") from None
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {process.returncode}: {text}")
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# With RABBITMQ4_ROOT set (.ci/run sets it), nodes are RabbitMQ 4 from scripts/rabbitmq4.sh's
# Debian 13 root; their directories are under RABBITMQ4_NODES, which means the same path inside
# the root and out. Unset: the machine's own rabbitmq-server.
RABBITMQ4 = str(Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq4.sh")
IN_ROOT = bool(os.environ.get("RABBITMQ4_ROOT"))


class RabbitNode:
    """``rabbitmq-server -detached`` as node ``fault<port>@localhost``, in a temporary directory."""

    def __init__(self) -> None:
        base = None
        if IN_ROOT:  # as scripts/rabbitmq4.sh names it
            base = os.environ.get("RABBITMQ4_NODES") or os.environ["RABBITMQ4_ROOT"] + ".nodes"
            os.makedirs(base, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="orders-rabbit-", dir=base))
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"fault{self.port}@localhost"
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbit.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.dir / "plugins").write_text("[].\n")
        self._own()
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbit.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
        }
        self.pid = 0

    def url(self, vhost: str, port: int | None = None) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port or self.port}/{vhost}"

    def _own(self) -> None:
        """The node's files belong to the rabbitmq user (the root's own, chowned as it starts)."""
        if not IN_ROOT:
            for path in (self.dir, *self.dir.rglob("*")):
                shutil.chown(path, "rabbitmq", "rabbitmq")

    def configure(self, lines: str) -> None:
        """Add ``rabbit.conf`` lines before ``start`` (files they name must be in ``dir``)."""
        with (self.dir / "rabbit.conf").open("a") as conf:
            conf.write(lines)
        self._own()

    async def ctl(self, *args: str, timeout: float = 60) -> str:
        tool = (RABBITMQ4, "ctl") if IN_ROOT else ("rabbitmqctl",)
        return await run(*tool, "-q", "-n", self.name, *args, timeout=timeout)

    async def start(self) -> None:
        await run(
            *((RABBITMQ4, "server") if IN_ROOT else ("rabbitmq-server", "-detached")), env=self.env
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                await self.ctl("await_startup", "--timeout", "10", timeout=20)
                break
            except RuntimeError:  # the first calls may exit 69 while the node boots
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
        self.pid = int((await self.ctl("eval", "list_to_integer(os:getpid()).")).strip())

    async def add_vhost(self, vhost: str) -> None:
        await self.ctl("add_vhost", vhost)
        await self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    async def kill(self) -> None:
        """SIGKILL the Erlang VM: a crash."""
        os.kill(self.pid, signal.SIGKILL)
        while _alive(self.pid):
            await asyncio.sleep(0.1)

    async def restart_after_kill(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                await self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(2)

    async def join(self, seed: "RabbitNode") -> None:
        """Join ``seed``'s cluster (the same Erlang cookie: every node runs as rabbitmq)."""
        await self.ctl("stop_app")
        await self.ctl("join_cluster", seed.name)
        await self.ctl("start_app")

    async def restart(self) -> None:
        """Stop the node cleanly and start it again on its data: one step of a rolling restart."""
        await self.ctl("stop", timeout=120)
        while _alive(self.pid):
            await asyncio.sleep(0.1)
        await self.start()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.resume()
            await self.ctl("stop", timeout=60)
        if self.pid and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitCluster:
    """Three ``RabbitNode``s joined into one cluster; clients are given every node's address."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RabbitNode() for _ in range(size)]
        for node in self.nodes:  # a minority stops serving rather than diverge
            node.configure("cluster_partition_handling = pause_minority\n")

    def url(self, vhost: str) -> str:
        listed = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"amqp://guest:guest@{listed}/{vhost}"

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()
        for node in self.nodes[1:]:
            await node.join(self.nodes[0])

    async def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` on the first node that answers."""
        for node in self.nodes:
            if node.pid and _alive(node.pid):
                with contextlib.suppress(RuntimeError):
                    return await node.ctl(*args, timeout=timeout)
        raise RuntimeError(f"no node of the cluster answered rabbitmqctl {' '.join(args)}")

    def node(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    async def leaders(self, vhost: str) -> dict[str, str]:
        """Each quorum queue of ``vhost`` and the node that leads it."""
        out = await self.ctl("list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
        return dict(line.split() for line in out.splitlines() if line.strip())

    async def node_of(self, connection: str) -> RabbitNode:
        """The node a client's connection named ``connection`` is open on (by its AMQP port)."""
        out = await self.ctl("list_connections", "port", "client_properties", "--formatter", "json")
        for listed in json.loads(out):
            properties = {key: value for key, _, value in listed["client_properties"]}
            if properties.get("connection_name") == connection:
                return next(node for node in self.nodes if node.port == listed["port"])
        raise RuntimeError(f"no connection named {connection!r}: {out}")

    async def add_vhost(self, vhost: str) -> None:
        await self.ctl("add_vhost", vhost)
        await self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))


class PostgresNode:
    """A PostgreSQL cluster of our own: ``initdb`` and ``pg_ctl`` as the postgres user."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="orders-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = Path(found[-1])
        self.data = self.dir / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def _as_postgres(self, *args: str) -> str:
        return await run("runuser", "-u", "postgres", "--", *args)

    async def start(self) -> None:
        if not self.data.exists():
            await self._as_postgres(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"
            )
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        deadline = time.monotonic() + 60
        while True:  # after a crash, start works once the old backends have exited
            try:
                await self._as_postgres(
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.dir / "log"),
                    "-w",
                    "start",
                )
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    async def kill(self) -> None:
        """SIGKILL the postmaster: a crash."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._as_postgres(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
            )
        shutil.rmtree(self.dir, ignore_errors=True)
