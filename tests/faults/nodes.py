"""RabbitMQ nodes (one, or three in a cluster) and a PostgreSQL server of our own, on free ports,
for tests that break them.

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

from testbed.netns import Host, alive, run
from testbed.processes import free_port

# With RABBITMQ4_ROOT set (.ci/run sets it), nodes are RabbitMQ 4 from scripts/rabbitmq4.sh's
# Debian 13 root; their directories are under RABBITMQ4_NODES, which means the same path inside
# the root and out. Unset: the machine's own rabbitmq-server.
RABBITMQ4 = str(Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq4.sh")
IN_ROOT = bool(os.environ.get("RABBITMQ4_ROOT"))


class RabbitNode:
    """``rabbitmq-server -detached`` as node ``fault<port>@localhost``, in a temporary directory;
    with a ``host``, as ``fault<port>@<host>`` inside that host's namespace."""

    def __init__(self, host: Host | None = None) -> None:
        base = None
        if IN_ROOT:  # as scripts/rabbitmq4.sh names it
            base = os.environ.get("RABBITMQ4_NODES") or os.environ["RABBITMQ4_ROOT"] + ".nodes"
            os.makedirs(base, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="orders-rabbit-", dir=base))
        self.host = host
        self.address = host.address if host else "127.0.0.1"
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"fault{self.port}@{host.name if host else 'localhost'}"
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbit.conf").write_text(
            f"listeners.tcp.default = {self.address}:{self.port}\n"
            # guest comes from the bridge, not from loopback, to a node on a host of its own
            + ("loopback_users = none\n" if host else "")
            # Not refused here, unlike on scripts/rabbitmq4.sh's other nodes, because these
            # restart: 4.0.5 asks at boot whether transient queues are used, before its metadata
            # store is ready (rabbit_amqqueue:are_transient_nonexcl_used); when the question
            # fails it answers "cannot tell", and with the feature refused the boot fails
            # (failed_to_deny_deprecated_features). A node rejoining after a partition met it in
            # CI (its log said so), and, most likely, one restarted after a kill that was not up
            # 120 s later (its log was not kept then; RabbitNode.start now prints it). 4.3
            # answers "not used" instead.
            + "deprecated_features.permit.transient_nonexcl_queues = true\n"
        )
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
        return f"amqp://guest:guest@{self.address}:{port or self.port}/{vhost}"

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

    def _here(self, *args: str) -> tuple[str, ...]:
        """``args`` as a command run where the node runs: in its host's namespace, if it has one
        (there ``rabbitmqctl`` reaches the node even while the host is cut off)."""
        return self.host.exec(*args) if self.host else args

    async def ctl(self, *args: str, timeout: float = 60) -> str:
        tool = (RABBITMQ4, "ctl") if IN_ROOT else ("rabbitmqctl",)
        return await run(*self._here(*tool), "-q", "-n", self.name, *args, timeout=timeout)

    async def start(self) -> None:
        server = (RABBITMQ4, "server") if IN_ROOT else ("rabbitmq-server", "-detached")
        await run(*self._here(*server), env=self.env)
        deadline = time.monotonic() + 120
        while True:
            try:
                await self.ctl("await_startup", "--timeout", "10", timeout=20)
                break
            except RuntimeError as error:  # the first calls may exit 69 while the node boots
                if time.monotonic() > deadline:
                    log = self.log()
                    raise RuntimeError(f"{self.name} did not start; its log:\n{log}") from error
                await asyncio.sleep(1)
        self.pid = int((await self.ctl("eval", "list_to_integer(os:getpid()).")).strip())

    def log(self, lines: int = 40) -> str:
        """The end of the node's own log: why it stopped, or would not start."""
        logs = sorted((self.dir / "log").glob("*.log"), key=lambda p: p.stat().st_mtime)
        text = logs[-1].read_text(errors="replace") if logs else ""
        return "\n".join(text.splitlines()[-lines:])

    async def add_vhost(self, vhost: str) -> None:
        await self.ctl("add_vhost", vhost)
        await self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    async def kill(self) -> None:
        """SIGKILL the Erlang VM: a crash."""
        os.kill(self.pid, signal.SIGKILL)
        while alive(self.pid):
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
        while alive(self.pid):
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
        if self.pid and alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitCluster:
    """Three ``RabbitNode``s joined into one cluster, each on a ``Host`` of its own (so that one
    can be cut off); clients are given every node's address. RabbitMQ 4 from the Debian 13 root
    (``RABBITMQ4_ROOT``), whose ``/etc/hosts`` names the hosts."""

    def __init__(self, size: int = 3) -> None:
        if not IN_ROOT:
            raise RuntimeError("a cluster's nodes are RabbitMQ 4: set RABBITMQ4_ROOT")
        self.hosts = [Host(n) for n in range(1, size + 1)]
        self.nodes = [RabbitNode(host) for host in self.hosts]
        for node in self.nodes:  # a minority stops serving rather than diverge, noticed in ~10 s
            node.configure("cluster_partition_handling = pause_minority\nnet_ticktime = 10\n")

    def url(self, vhost: str) -> str:
        listed = ",".join(f"{node.address}:{node.port}" for node in self.nodes)
        return f"amqp://guest:guest@{listed}/{vhost}"

    async def start(self) -> None:
        for host in self.hosts:
            await host.create()
        for node in self.nodes:
            await node.start()
        for node in self.nodes[1:]:
            await node.join(self.nodes[0])

    async def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` on the first node that answers."""
        for node in self.nodes:
            if node.pid and alive(node.pid):
                with contextlib.suppress(RuntimeError):
                    return await node.ctl(*args, timeout=timeout)
        raise RuntimeError(f"no node of the cluster answered rabbitmqctl {' '.join(args)}")

    def node(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    async def leaders(self, vhost: str, seen_by: RabbitNode | None = None) -> dict[str, str]:
        """Each quorum queue of ``vhost`` and the node that leads it (as ``seen_by`` sees it)."""
        args = ("list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
        out = await (seen_by.ctl(*args) if seen_by else self.ctl(*args))
        return dict(line.split() for line in out.splitlines() if line.strip())

    async def node_of(self, connection: str) -> RabbitNode:
        """The node a client's connection named ``connection`` is open on (by its AMQP port)."""
        out = await self.ctl("list_connections", "port", "client_properties", "--formatter", "json")
        for listed in json.loads(out):
            properties = {key: value for key, _, value in listed["client_properties"]}
            if properties.get("connection_name") == connection:
                return next(node for node in self.nodes if node.port == listed["port"])
        raise RuntimeError(f"no connection named {connection!r}: {out}")

    async def running(self, seen_by: RabbitNode) -> set[str]:
        """The nodes that ``seen_by`` counts as running in its cluster."""
        out = await seen_by.ctl("cluster_status", "--formatter", "json")
        return set(json.loads(out)["running_nodes"])

    async def add_vhost(self, vhost: str) -> None:
        await self.ctl("add_vhost", vhost)
        await self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))
        for host in self.hosts:
            await host.remove()
        await Host.remove_bridge()


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
        while alive(pid):
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._as_postgres(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
            )
        shutil.rmtree(self.dir, ignore_errors=True)
