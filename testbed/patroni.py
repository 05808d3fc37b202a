"""A PostgreSQL that fails over, on hosts of a test's own (``testbed/netns.py``): for the fault
suite's ``db-*`` scenarios and ``make bench-ha``."""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from testbed.netns import Host, run
from testbed.processes import free_port

POSTGRES_HA = str(Path(__file__).resolve().parents[1] / "scripts" / "postgres-ha.sh")


class PostgresCluster:
    """A primary, a synchronous standby and a second standby that fail over by themselves:
    PostgreSQL 17 under Patroni 4 (``synchronous_mode_strict``: no commit is acknowledged that
    the synchronous standby has not flushed, and only that standby is promoted; the second
    standby becomes the new primary's synchronous one, so writes go on with a member down).
    Each member on a ``Host`` of its own, with one etcd on this side of the bridge as Patroni's
    store. From the Debian 13 root (``scripts/postgres-ha.sh``)."""

    SCOPE = "orders"

    def __init__(self, size: int = 3) -> None:
        """``size`` 1: one PostgreSQL under Patroni, no standby (what replication is measured
        against; strict synchronous mode would refuse its writes)."""
        if not os.environ.get("RABBITMQ4_ROOT"):
            raise RuntimeError(
                "the failover cluster comes from the Debian 13 root: set RABBITMQ4_ROOT"
            )
        base = os.environ.get("RABBITMQ4_NODES") or os.environ["RABBITMQ4_ROOT"] + ".nodes"
        os.makedirs(base, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="orders-pgha-", dir=base))
        self.dir.chmod(0o1777)  # its members (postgres) and etcd (etcd) make their own
        self.hosts = [Host(n) for n in range(4, 4 + size)]  # beside a RabbitCluster's 1-3
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.members: dict[str, subprocess.Popen[bytes]] = {}
        self._etcd: subprocess.Popen[bytes] | None = None
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
                    "synchronous_mode": len(self.hosts) > 1,
                    "synchronous_mode_strict": len(self.hosts) > 1,
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
        client = f"http://{Host.NETWORK}.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._etcd = self._spawn(
            "etcd.log",
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
        )
        for host in self.hosts:
            await self.start_member(host)
        await self.healthy()

    async def start_member(self, host: Host) -> None:
        if (before := self.members.get(host.name)) is not None:  # killed with its host
            await _reaped(before)
        config = str(self._config(host))
        self.members[host.name] = self._spawn(
            f"{host.name}.log", *host.exec(POSTGRES_HA, "patroni", config)
        )

    def _spawn(self, log: str, *args: str) -> subprocess.Popen[bytes]:
        """A daemon of the cluster's, its output appended to ``log`` in the cluster's directory.
        Not an asyncio subprocess: it outlives the event loop that starts it (a fixture's)."""
        with (self.dir / log).open("ab") as output:
            return subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)

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
        wanted = ["leader", *["replica"] * (len(self.hosts) - 2), "sync_standby"][: len(self.hosts)]
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
            await host.remove()  # its member, and anything else in it
        for process in (self._etcd, *self.members.values()):
            if process is not None:
                await _reaped(process)
        await Host.remove_bridge()
        shutil.rmtree(self.dir, ignore_errors=True)


async def _reaped(process: subprocess.Popen[bytes]) -> None:
    """``process`` killed (nothing, if it is gone already) and waited for, within 10 s."""
    process.kill()
    deadline = time.monotonic() + 10
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
