"""Configuration, read from the environment by each service's entry point and passed down."""

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import hosts
from shared.topology import Kind

URL_PASSWORDS = {"rabbitmq_password": "rabbitmq_url", "database_password": "database_url"}


class Settings(BaseSettings):
    """What both services read.

    A ``<name>_FILE`` setting names a file holding a secret (compose mounts them under
    ``/run/secrets``): ``RABBITMQ_PASSWORD_FILE`` and ``DATABASE_PASSWORD_FILE`` put their
    password into the URL, any other ``X_FILE`` fills ``X``.
    """

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/orders"
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, else JSON
    startup_timeout: float = Field(60.0, gt=0, description="seconds to wait for the database")
    publish_timeout: float = Field(10.0, gt=0, description="seconds to wait for a confirm")
    queue_kind: Kind = Field(
        Kind.CLASSIC,
        description="classic: one priority queue per lane; quorum: replicated, a queue per"
        " priority (docs/messages.md); what python -m shared.setup declared",
    )
    amqp_fast_path: bool = Field(
        True, description="the relay's and consumers' hot paths in shared/aiormq_private.py"
    )
    crawl_allowed_private_hosts: str = Field(
        "", description="comma-separated hosts crawls may reach on non-public addresses"
    )
    webhook_allowed_private_hosts: str = Field(
        "", description="comma-separated hosts webhooks may reach on non-public addresses"
    )
    rabbitmq_password_file: Path | None = None
    database_password_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, path in list(data.items()):
            if not name.endswith("_file") or not path:
                continue
            secret = Path(path).read_text().strip()
            target = name.removesuffix("_file")
            if target in URL_PASSWORDS:
                url_field = URL_PASSWORDS[target]
                url = data.get(url_field) or cls.model_fields[url_field].default
                data[url_field] = hosts.with_password(url, secret)
            else:
                data[target] = secret
        return data


class ProducerSettings(Settings):
    """The HTTP API and the outbox relay (in the API's process, or in one of its own)."""

    host: str = "0.0.0.0"
    port: int = 8000
    # Longer than clients and proxies keep an idle connection (httpx 5 s, load balancers 60 s):
    # the client then closes it first, never reusing one the server is closing at that moment.
    keep_alive_seconds: int = Field(65, ge=1, description="seconds an idle HTTP connection stays")
    max_body_bytes: int = Field(1_048_576, gt=0)
    db_pool_size: int = Field(10, ge=1)
    relay_inline: bool = Field(
        True, description="relay in the API's process; false: `python -m producer relay` runs it"
    )
    relay_batch: int = Field(1000, ge=1, description="outbox rows published per round")
    relay_interval: float = Field(1.0, gt=0, description="seconds between outbox sweeps")
    max_outbox: int = Field(100_000, ge=1, description="unpublished orders before 503")
    max_queue_depth: int = Field(500_000, ge=1, description="queued orders before 503")
    demo_catalogue: bool = False
    api_keys: SecretStr = Field(
        SecretStr(""), description="comma-separated keys, each optionally name:key; required"
    )
    api_keys_file: Path | None = None
    rate_limit_per_second: float = Field(200.0, ge=0, description="per key and process; 0: off")
    rate_limit_burst: int = Field(400, ge=1)
    metrics_need_key: bool = False
    dashboard_needs_key: bool = False
    streams_per_key: int = Field(20, ge=1, description="event streams open per key and process")
    streams_max: int = Field(1000, ge=1, description="event streams open per process")
    events_retention_hours: float = Field(
        168.0, gt=0, description="hours an order event is kept (the relay deletes older ones)"
    )


class ConsumerSettings(Settings):
    """One worker process."""

    prefetch: int = Field(4, ge=1, description="unacked deliveries per process")
    concurrency: int = Field(4, ge=1, description="orders processed at once per process")
    order_work_ms: int = Field(100, ge=0, description="simulated external work per order")
    # Below RabbitMQ's consumer_timeout (30 min by default), which would close the channel.
    order_timeout: float = Field(60.0, gt=0, lt=1800, description="seconds one attempt may take")
    retry_base_ms: int = Field(1_000, ge=1)
    retry_cap_ms: int = Field(300_000, ge=1)
    max_attempts: int = Field(8, ge=1)
    payment_failure_rate: float = Field(0.0, ge=0, le=1)
    payment_failures_per_order: int = Field(0, ge=0)
    shutdown_grace: float = Field(25.0, gt=0, description="seconds to finish in-flight work")
    # Below consumer_timeout too: past it RabbitMQ closes the channel and counts a return of each.
    hold_limit: float = Field(
        300.0, gt=0, lt=1800, description="seconds a delivery may wait unstarted in a consumer"
    )
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics; 0: off")
    crawl_concurrency: int = Field(4, ge=1, description="crawl tasks handled at once")
    crawl_prefetch: int = Field(16, ge=1, description="unacked crawl tasks: the LIFO window")
    crawl_max_attempts: int = Field(3, ge=1)
    crawl_retry_base_ms: int = Field(1_000, ge=1)
    crawl_retry_cap_ms: int = Field(300_000, ge=1)
    crawl_task_timeout: float = Field(60.0, gt=0, lt=1800, description="seconds per attempt")
    crawl_fetch_timeout: float = Field(10.0, gt=0, description="seconds per HTTP request")
    crawl_max_bytes: int = Field(2_000_000, ge=1, description="largest response read")
    crawl_max_redirects: int = Field(5, ge=0, description="redirects followed in a row")
    crawl_host_concurrency: int = Field(2, ge=1, description="requests at once per host")
    crawl_host_delay_ms: int = Field(250, ge=0, description="between requests to one host")
    crawl_user_agent: str = "orders-crawler/0.1"
    webhook_concurrency: int = Field(8, ge=1, description="webhook deliveries sent at once")
    webhook_prefetch: int = Field(16, ge=1, description="unacked webhook deliveries")
    webhook_max_attempts: int = Field(48, ge=1, description="attempts before the dead letters")
    webhook_retry_base_ms: int = Field(5_000, ge=1, description="the first retry's delay")
    webhook_retry_cap_ms: int = Field(3_600_000, ge=1, description="the longest retry delay")
    webhook_timeout: float = Field(10.0, gt=0, lt=1800, description="seconds per attempt")
    webhook_max_response_bytes: int = Field(65_536, ge=0, description="of an answer read")
    webhook_disable_after_hours: float = Field(
        24.0, gt=0, description="hours an endpoint may fail without a success before disabled"
    )
    consumer_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="recorded on each order it settles, and shown to RabbitMQ",
    )

    @property
    def crawler(self) -> "CrawlerSettings":
        """The crawl lane's own settings (the ``CRAWL_*`` variables): all the crawler reads."""
        prefix = "crawl_"
        return CrawlerSettings(
            **{
                name: getattr(self, prefix + name)
                for name in CrawlerSettings.model_fields
                if name != "allowed_private_hosts"
            },
            allowed_private_hosts=self.crawl_allowed_private_hosts,
        )

    @property
    def webhooks(self) -> "WebhookSettings":
        """The webhook lane's own settings (the ``WEBHOOK_*`` variables)."""
        prefix = "webhook_"
        return WebhookSettings(
            **{name: getattr(self, prefix + name) for name in WebhookSettings.model_fields}
        )


class CrawlerSettings(BaseModel):
    """What the crawl handler and its fetcher are told: ``ConsumerSettings.crawler``."""

    model_config = ConfigDict(frozen=True)

    concurrency: int
    prefetch: int
    max_attempts: int
    task_timeout: float
    fetch_timeout: float
    max_bytes: int
    max_redirects: int
    host_concurrency: int
    host_delay_ms: int
    user_agent: str
    allowed_private_hosts: str
    retry_base_ms: int
    retry_cap_ms: int


class WebhookSettings(BaseModel):
    """What the webhook handler is told: ``ConsumerSettings.webhooks``."""

    model_config = ConfigDict(frozen=True)

    concurrency: int
    prefetch: int
    max_attempts: int
    retry_base_ms: int
    retry_cap_ms: int
    timeout: float
    max_response_bytes: int
    disable_after_hours: float
    allowed_private_hosts: str


class SetupSettings(Settings):
    """``python -m shared.setup``: the operator's broker account and the database owner."""

    producer_db_user: str = Field("", description="the producer's own role; empty: none made")
    producer_db_password: SecretStr | None = None
    producer_db_password_file: Path | None = None
    consumer_db_user: str = Field("", description="the consumer's own role; empty: none made")
    consumer_db_password: SecretStr | None = None
    consumer_db_password_file: Path | None = None
