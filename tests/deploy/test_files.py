"""docker-compose.yml and the Dockerfile, checked without a Docker engine."""

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


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "warning", "Dockerfile"],
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
