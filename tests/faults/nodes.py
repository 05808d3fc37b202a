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
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RABBITMQ4, POSTGRES_HA = str(SCRIPTS / "rabbitmq4.sh"), str(SCRIPTS / "postgres-ha.sh")
IN_ROOT = bool(os.environ.get("RABBITMQ4_ROOT"))


class Host:
    """A machine of a cluster's own: a network namespace on a bridge of the test's
    (``10.232.0.0/24``), with a name that the Debian 13 root resolves (its ``/etc/hosts``).
    Taking its link down cuts it off from the other hosts and from every client at once."""

    BRIDGE, NETWORK = "orders-fbr", "10.232.0"

    def __init__(self, number: int) -> None:
        self.name = f"orders-fh{number}"  # the namespace's and the host's
        self.address = f"{self.NETWORK}.{10 + number}"
        self.link = f"orders-fv{number}"  # the bridge's end of its veth pair

    def exec(self, *args: str) -> tuple[str, ...]:
        """``args`` as a command run inside the namespace, under the host's name (a CLI node is
        named after the host it runs on, and the nodes it talks to connect back to that name)."""
        named = ("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name)
        return ("ip", "netns", "exec", self.name, *named, *args)

    async def create(self) -> None:
        await self.remove()  # what an interrupted run left
        with contextlib.suppress(RuntimeError):  # the bridge is there already
            await run("ip", "link", "add", self.BRIDGE, "type", "bridge")
            await run("ip", "addr", "add", f"{self.NETWORK}.1/24", "dev", self.BRIDGE)
        await run("ip", "link", "set", self.BRIDGE, "up")
        await run("ip", "netns", "add", self.name)
        await run(
            "ip",
            "link",
            "add",
            self.link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.name,
        )
        await run("ip", "link", "set", self.link, "master", self.BRIDGE, "up")
        await run("ip", "-n", self.name, "addr", "add", f"{self.address}/24", "dev", "eth0")
        await run("ip", "-n", self.name, "link", "set", "eth0", "up")
        await run("ip", "-n", self.name, "link", "set", "lo", "up")
        hosts = Path(os.environ["RABBITMQ4_ROOT"]) / "etc" / "hosts"
        entry = f"{self.address} {self.name}\n"
        if entry not in hosts.read_text():
            with hosts.open("a") as file:
                file.write(entry)

    async def kill_all(self) -> None:
        """SIGKILL everything that runs in the namespace, and wait until it is gone: the machine
        dies."""
        pids = [int(pid) for pid in (await run("ip", "netns", "pids", self.name)).split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while any(_alive(pid) for pid in pids):
            await asyncio.sleep(0.1)

    async def cut(self) -> None:
        await run("ip", "link", "set", self.link, "down")

    async def heal(self) -> None:
        await run("ip", "link", "set", self.link, "up")

    async def remove(self) -> None:
        """Kill what still runs in the namespace (epmd outlives its node), then delete it."""
        with contextlib.suppress(RuntimeError):
            await self.kill_all()
            await run("ip", "netns", "del", self.name)
        with contextlib.suppress(
            RuntimeError
        ):  # gone with the namespace, unless a run was cut short
            await run("ip", "link", "del", self.link)

    @classmethod
    async def remove_bridge(cls) -> None:
        with contextlib.suppress(RuntimeError):
            await run("ip", "link", "del", cls.BRIDGE)


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
            if node.pid and _alive(node.pid):
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
        while _alive(pid):
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._as_postgres(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
            )
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresCluster:
    """A primary, a synchronous standby and a second standby that fail over by themselves:
    PostgreSQL 17 under Patroni 4 (``synchronous_mode_strict``: no commit is acknowledged that
    the synchronous standby has not flushed, and only that standby is promoted; the second
    standby becomes the new primary's synchronous one, so writes go on with a member down).
    Each member on a ``Host`` of its own, with one etcd on this side of the bridge as Patroni's
    store. From the Debian 13 root (``scripts/postgres-ha.sh``)."""

    SCOPE = "orders"

    def __init__(self, size: int = 3) -> None:
        if not IN_ROOT:
            raise RuntimeError(
                "the failover cluster comes from the Debian 13 root: set RABBITMQ4_ROOT"
            )
        base = os.environ.get("RABBITMQ4_NODES") or os.environ["RABBITMQ4_ROOT"] + ".nodes"
        os.makedirs(base, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="orders-pgha-", dir=base))
        self.dir.chmod(0o1777)  # its members (postgres) and etcd (etcd) make their own
        self.hosts = [Host(n) for n in range(4, 4 + size)]  # beside a RabbitCluster's 1-3
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.members: dict[str, asyncio.subprocess.Process] = {}
        self._etcd: asyncio.subprocess.Process | None = None
        self.failovers = 0

    def url(self, database: str = "postgres") -> str:
        listed = ",".join(f"{host.address}:5432" for host in self.hosts)
        return f"postgresql://postgres@{listed}/{database}"

    def _config(self, host: Host) -> Path:
        sockets = self.dir / host.name
        sockets.mkdir(exist_ok=True)
        sockets.chmod(0o1777)
        config = {
            "scope": self.SCOPE,
            "name": host.name,
            "restapi": {
                "listen": f"{host.address}:8008",
                "connect_address": f"{host.address}:8008",
            },
            "etcd3": {"host": f"{Host.NETWORK}.1:{self.etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": 20,
                    "loop_wait": 2,
                    "retry_timeout": 5,
                    "synchronous_mode": True,
                    "synchronous_mode_strict": True,
                    "postgresql": {"use_pg_rewind": True, "parameters": {"max_connections": 200}},
                }
            },
            "postgresql": {
                "listen": "0.0.0.0:5432",
                "connect_address": f"{host.address}:5432",
                "data_dir": str(self.dir / f"{host.name}-data"),
                "bin_dir": "/usr/lib/postgresql/17/bin",
                "pgpass": str(sockets / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "replicator"},
                    "rewind": {"username": "postgres"},
                },
                # the test's own hosts only, on a bridge nothing else reaches
                "pg_hba": [
                    "local all all trust",
                    "host all all 0.0.0.0/0 trust",
                    "host replication all 0.0.0.0/0 trust",
                ],
                "parameters": {"unix_socket_directories": str(sockets)},
            },
        }
        path = self.dir / f"{host.name}.yml"
        path.write_text(json.dumps(config))  # YAML is a superset of JSON
        return path

    async def start(self) -> None:
        await run(POSTGRES_HA, "root", timeout=600)
        for host in self.hosts:
            await host.create()
        log = (self.dir / "etcd.log").open("ab")
        client = f"http://{Host.NETWORK}.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._etcd = await asyncio.create_subprocess_exec(
            POSTGRES_HA,
            "etcd",
            "--name",
            "etcd",
            "--data-dir",
            str(self.dir / "etcd"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"etcd={peer}",
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        for host in self.hosts:
            await self.start_member(host)
        await self.healthy()

    async def start_member(self, host: Host) -> None:
        log = (self.dir / f"{host.name}.log").open("ab")
        self.members[host.name] = await asyncio.create_subprocess_exec(
            *host.exec(POSTGRES_HA, "patroni", str(self._config(host))),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )

    async def roles(self, seen_by: Host | None = None) -> dict[str, str]:
        """Each member's role (``leader``, ``sync_standby``, ``replica``) where it is running or
        streaming, as the first member that answers (or ``seen_by``) sees the cluster."""
        for host in [seen_by] if seen_by else self.hosts:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                out = await run(
                    "curl", "-sf", "--max-time", "2", f"http://{host.address}:8008/cluster"
                )
                return {
                    m["name"]: m["role"]
                    for m in json.loads(out)["members"]
                    if m.get("state") in ("running", "streaming")
                }
        return {}

    def host(self, name: str) -> Host:
        return next(host for host in self.hosts if host.name == name)

    async def leader(self, seen_by: Host | None = None) -> Host | None:
        roles = await self.roles(seen_by)
        return next((self.host(n) for n, role in roles.items() if role == "leader"), None)

    async def healthy(self, timeout: float = 180) -> None:
        """Until one member leads, one is its synchronous standby, and every other streams."""
        deadline = time.monotonic() + timeout
        wanted = ["leader", *["replica"] * (len(self.hosts) - 2), "sync_standby"]
        while sorted((await self.roles()).values()) != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader with a synchronous standby: {await self.roles()}")
            await asyncio.sleep(1)

    async def promoted(self, other_than: Host, timeout: float = 90) -> Host:
        """Until a member other than ``other_than`` leads, as that member sees it; it."""
        deadline = time.monotonic() + timeout
        while True:
            for host in self.hosts:
                if host is not other_than and await self.leader(seen_by=host) is host:
                    self.failovers += 1
                    return host
            if time.monotonic() > deadline:
                raise RuntimeError(f"no member but {other_than.name} was promoted")
            await asyncio.sleep(0.5)

    async def switchover(self, leader: Host, candidate: Host) -> None:
        """A planned switchover through the leader's REST API, as ``patronictl switchover`` does."""
        body = json.dumps({"leader": leader.name, "candidate": candidate.name})
        await run(
            "curl",
            "-sf",
            "--max-time",
            "60",
            "-XPOST",
            "-d",
            body,
            f"http://{leader.address}:8008/switchover",
            timeout=90,
        )

    async def stop(self) -> None:
        for host in self.hosts:
            await host.remove()
        if self._etcd and self._etcd.returncode is None:
            self._etcd.kill()
            await self._etcd.wait()
        for member in self.members.values():
            with contextlib.suppress(ProcessLookupError):
                member.kill()
        await Host.remove_bridge()
        shutil.rmtree(self.dir, ignore_errors=True)
