"""docker-compose.yml and the Dockerfile, checked without a Docker engine."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from shared.settings import ConsumerSettings, ProducerSettings, SetupSettings

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is a dev dependency; run `make sync`"
    return path


def test_compose_file_is_valid_for_compose_v2() -> None:
    result = subprocess.run(
        [_tool("docker-compose"), "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_cluster_variant_is_valid_and_replicated_everywhere() -> None:
    result = subprocess.run(
        [
            *(_tool("docker-compose"), "-f", "docker-compose.yml"),
            *("-f", "docker-compose.cluster.yml", "config", "--format", "json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    nodes = ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    assert all({"source": "erlang_cookie"} in services[n]["secrets"] for n in nodes)
    assert [services[n].get("hostname") for n in nodes] == nodes
    members = ["postgres", "postgres-2", "postgres-3"]
    assert [services[n].get("hostname") for n in members] == members  # Patroni's member names
    for name in ("setup", "producer", "relay", "consumer"):
        env = services[name]["environment"]
        assert env["QUEUE_KIND"] == "quorum"
        assert env["RABBITMQ_URL"].split("@")[1].split("/")[0] == (
            "rabbitmq:5672,rabbitmq-2:5672,rabbitmq-3:5672"
        )
        assert env["DATABASE_URL"].split("@")[1].split("/")[0] == (
            "postgres:5432,postgres-2:5432,postgres-3:5432"
        )
    assert set(services["setup"]["depends_on"]) == {*nodes, *members}
    # Patroni's store is reached by the members alone.
    on_patroni = {name for name, s in services.items() if "patroni" in s.get("networks", {})}
    assert on_patroni == {"etcd", "etcd-2", "etcd-3", *members}
    assert all(set(services[n]["networks"]) == {"patroni"} for n in ("etcd", "etcd-2", "etcd-3"))
    assert all({"source": "replication_password"} in services[n]["secrets"] for n in members)


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [
            *(_tool("hadolint"), "--failure-threshold", "warning"),
            *("Dockerfile", "deploy/postgres-ha/Dockerfile"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_follows_the_conventions_scaling_relies_on() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "version" not in compose
    assert compose["name"] == "orders"
    services = compose["services"]
    assert {"rabbitmq", "postgres", "producer", "relay", "consumer"} <= set(services)
    consumer = services["consumer"]
    assert "container_name" not in consumer
    assert "ports" not in consumer
    assert consumer["init"] is True
    assert consumer["stop_grace_period"] == "30s"
    # The API stores, the relay publishes: exactly one of them runs the outbox relay.
    assert services["producer"]["environment"]["RELAY_INLINE"] == "false"
    assert services["relay"]["command"] == ["python", "-m", "producer", "relay"]
    for name in ("producer", "relay", "consumer"):  # setup declared and migrated everything
        assert services[name]["depends_on"] == {
            "setup": {"condition": "service_completed_successfully"}
        }
    assert services["setup"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert services["setup"]["command"] == ["python", "-m", "shared.setup"]
    assert services["rabbitmq"]["hostname"] == "rabbitmq"
    assert "healthcheck" in services["rabbitmq"]
    assert "healthcheck" in services["postgres"]
    assert set(compose["volumes"]) == {"rabbitmq-data", "postgres-data"}


def test_metrics_are_scraped_from_every_service_in_the_observability_profile() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert "ports" not in services["consumer"]  # scraped inside the network only
    plugins = (ROOT / "deploy/rabbitmq/enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["producer"]["static_configs"][0]["targets"] == ["producer:8000"]
    assert jobs["relay"]["static_configs"][0]["targets"] == ["relay:8000"]
    assert jobs["consumer"]["dns_sd_configs"][0] == {
        "names": ["consumer"],
        "type": "A",
        "port": 9100,
    }
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]


def test_env_example_shows_every_setting() -> None:
    shown = {
        line.lstrip("# ").split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line
    }
    fields = {
        f for s in (ProducerSettings, ConsumerSettings, SetupSettings) for f in s.model_fields
    }
    assert {f.upper() for f in fields} - shown == set()


# Set by compose itself, whatever .env says (the comment at the top of docker-compose.yml).
COMPOSE_SETS = {
    "RABBITMQ_URL",
    "DATABASE_URL",
    "RABBITMQ_PASSWORD_FILE",
    "DATABASE_PASSWORD_FILE",
    "API_KEYS",
    "API_KEYS_FILE",
    "HOST",
    "PORT",
    "METRICS_PORT",
    "RELAY_INLINE",
    "CONSUMER_NAME",
}
READERS = {"both": ("producer", "relay", "consumer"), "producer": ("producer", "relay")}
READERS["consumer"] = ("consumer",)
READERS["both, setup"] = (*READERS["both"], "setup")


def readme_settings() -> dict[str, str]:
    """The README's configuration table: each variable and who reads it."""
    table = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    found = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
                found[name] = cells[2]
    return found


def test_every_setting_in_env_reaches_the_services_that_read_it(tmp_path: Path) -> None:
    """A value in .env is what the service that reads it gets, for every setting the README
    lists, except those compose sets itself; compose's own values stay compose's."""
    settings = readme_settings()
    assert len(settings) > 40
    assert set(settings.values()) == set(READERS)
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / ".env").write_text("".join(f"{name}=set-in-env-{name}\n" for name in settings))
    rendered = subprocess.run(
        [_tool("docker-compose"), "config", "--format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    services = json.loads(rendered.stdout)["services"]
    for name, readers in settings.items():
        for service in READERS[readers]:
            got = services[service]["environment"].get(name)
            if name in COMPOSE_SETS:
                assert got != f"set-in-env-{name}", (service, name)
            else:
                assert got == f"set-in-env-{name}", (service, name)
    for service in ("producer", "relay", "consumer"):
        assert "CONSUMER_NAME" not in services[service]["environment"]  # each replica its own


def test_the_images_are_built_once_each_from_base_images_that_are_parameters() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["relay"]["image"] == services["producer"]["image"]
    assert services["setup"]["image"] == services["consumer"]["image"]
    assert services["rabbitmq"]["image"] == "${RABBITMQ_IMAGE:-rabbitmq:4.1-management}"
    assert services["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:17-alpine}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^# *syntax=", dockerfile, re.M)  # BuildKit would fetch a frontend
    pinned = re.search(r"^ARG UV_IMAGE=ghcr.io/astral-sh/uv:(\S+)$", dockerfile, re.M)
    assert pinned, "the uv image is a build argument with a version"
    makefile = (ROOT / "Makefile").read_text()
    assert f"UV_VERSION := {pinned[1]}\n" in makefile  # the same uv everywhere
    for service in ("producer", "consumer"):
        assert services[service]["build"]["args"]["UV_IMAGE"].endswith(f"uv:{pinned[1]}}}")


def test_the_consumer_is_healthy_only_while_consuming_and_keeps_its_scale() -> None:
    consumer = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["consumer"]
    assert consumer["healthcheck"]["test"] == ["CMD", "python", "-m", "consumer", "health"]
    assert consumer["deploy"]["replicas"] == "${CONSUMER_REPLICAS:-1}"


def test_the_readmes_key_command_reads_the_first_key_after_a_rotation(tmp_path: Path) -> None:
    """docs/security.md rotates a key by appending ``,new:KEY`` to secrets/api-keys."""
    [command] = re.findall(r"^export KEY=(\$\(.*\))", (ROOT / "README.md").read_text(), re.M)
    (tmp_path / "secrets").mkdir()
    for content in ("local:first-Key_1\n", "local:first-Key_1,new:second-Key_2\n"):
        (tmp_path / "secrets" / "api-keys").write_text(content)
        shown = subprocess.run(
            ["bash", "-c", f"echo {command}"], cwd=tmp_path, capture_output=True, text=True
        )
        assert shown.stdout.strip() == "first-Key_1", (content, shown.stderr)


def test_the_smoke_script_uses_ports_of_its_own_and_demands_five_consumers() -> None:
    script = (ROOT / "scripts/smoke.sh").read_text()
    defaults = {int(p) for p in re.findall(r"\$\{SMOKE_\w+:-(\d+)\}", script)}
    assert len(defaults) == 2
    assert not defaults & {4369, 5672, 15672, 15692, 25672}  # RabbitMQ's own
    assert '[ "$workers" -eq 5 ] || {' in script  # fewer than five sharing the work fails
