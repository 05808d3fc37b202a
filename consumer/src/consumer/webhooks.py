"""What handling a webhook delivery means: send one stored order event to its receiver, signed.

The message names a row of ``webhook_deliveries`` (schema/0011_webhooks.sql); its URL, payload
and secret are read from the database, never carried by the broker. Each attempt is one POST
following Standard Webhooks (docs/notifications.md):

- ``webhook-id`` is the delivery's id, the same on every attempt: the receiver's key for
  dropping a duplicate;
- ``webhook-signature`` is ``v1,`` and the base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``,
  keyed by the endpoint's secret (for a ``callback_url``, the key's callback secret);
- redirects are not followed, the address policy of ``shared/urls.py`` applies at every
  connection, an attempt is bounded by WEBHOOK_TIMEOUT and at most WEBHOOK_MAX_RESPONSE_BYTES of
  the answer are read.

A 2xx delivers it. A 410 disables the endpoint, as does failing for WEBHOOK_DISABLE_AFTER_HOURS
without a success; the deliveries of a disabled or deleted endpoint are cancelled. Any other
answer, or none, is retried with backoff (the worker), then dead-lettered.
"""

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
import asyncpg
import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from consumer.delivery import Delivery
from consumer.fetcher import GuardedClient
from consumer.metrics import Metrics
from shared import db, messages, topology, urls
from shared.db import DeliveryStatus
from shared.errors import TransientError, Unrecognised
from shared.messages import Frontier
from shared.settings import WebhookSettings

USER_AGENT = "orders-webhooks/0.1"
CALLBACK = "callback"  # the endpoint label of deliveries to an order's callback_url

DELIVERY = """
    SELECT d.id, d.url, d.payload, d.status, d.endpoint_id,
           coalesce(e.secret, c.secret) AS secret,
           (e.disabled_at IS NOT NULL OR e.deleted_at IS NOT NULL) AS endpoint_off,
           e.failing_since IS NOT NULL AS endpoint_failing
      FROM webhook_deliveries d
      LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
      LEFT JOIN callback_secrets c ON d.endpoint_id IS NULL AND c.api_key = d.api_key
     WHERE d.id = $1
"""

SETTLE = """
    UPDATE webhook_deliveries
       SET status = $2, attempts = $3, last_status = $4, last_error = $5,
           delivered_at = CASE WHEN $2 = 'delivered' THEN clock_timestamp() END
     WHERE id = $1 AND status = 'pending'
"""

# A success ends the endpoint's failing spell; a failure starts one, or disables the endpoint
# once it has lasted the limit. Returns whether the endpoint is disabled now.
SUCCEEDED = "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1"
FAILED = """
    UPDATE webhook_endpoints
       SET failing_since = coalesce(failing_since, clock_timestamp()),
           disabled_at = CASE WHEN failing_since < clock_timestamp() - $2::interval
                              THEN clock_timestamp() END,
           disabled_reason = CASE WHEN failing_since < clock_timestamp() - $2::interval
                                  THEN $3 || ' since ' || failing_since::text END
     WHERE id = $1 AND disabled_at IS NULL
    RETURNING disabled_at IS NOT NULL
"""
GONE = """
    UPDATE webhook_endpoints
       SET disabled_at = clock_timestamp(), disabled_reason = 'the receiver answered 410 Gone'
     WHERE id = $1 AND disabled_at IS NULL
"""


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of Standard Webhooks (version ``v1``, HMAC-SHA256)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Answer:
    """What a receiver answered: its status, or why there was none (``status`` 0)."""

    status: int
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


class Sender(GuardedClient):
    """One aiohttp session for every delivery: guarded addresses, no redirects, no cookies."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.allowed_private = urls.parse_hosts(settings.allowed_private_hosts)

    def _open(self) -> aiohttp.ClientSession:
        return self._guarded(self.allowed_private, urls.WEBHOOKS, self.settings.timeout)

    async def send(self, url: str, webhook_id: str, body: bytes, secret: str) -> Answer:
        """POST ``body`` to ``url``, signed; the answer, or why there was none."""
        assert self._session is not None
        host = urls.host_of(url)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, webhook_id, timestamp, body),
        }
        try:
            if (literal := urls.ip_literal(host)) is not None:  # aiohttp does not resolve these
                urls.check_addresses(host, [literal], self.allowed_private, urls.WEBHOOKS)
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                text = await response.content.read(self.settings.max_response_bytes)
                if 200 <= response.status < 300:
                    return Answer(response.status)
                said = text.decode("utf-8", "replace").strip()[:200]
                reason = f"HTTP {response.status} {response.reason or ''}".strip()
                return Answer(response.status, f"{reason}: {said}" if said else reason)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.__cause__, urls.AddressRefused):
                return Answer(0, str(exc.__cause__))
            return Answer(0, f"cannot connect to {host}: {exc.os_error}")
        except urls.AddressRefused as exc:
            return Answer(0, str(exc))
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Answer(0, f"{type(exc).__name__}: {exc}".rstrip(": "))


class Undelivered(TransientError):
    """The receiver answered other than 2xx, or not at all: try again later."""


@dataclass(frozen=True)
class EndpointMetrics:
    """``webhook_attempts_total`` and ``webhook_attempt_seconds``, by endpoint."""

    attempts: Counter  # by endpoint and result: delivered, failed, gone
    seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "EndpointMetrics":
        return cls(
            Counter(
                "webhook_attempts",
                "Webhook attempts by endpoint (its id, or callback) and result",
                ["endpoint", "result"],
                registry=registry,
            ),
            Histogram(
                "webhook_attempt_seconds",
                "One webhook attempt, request to answer, by endpoint",
                ["endpoint"],
                registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
        )


class WebhookHandler:
    """The ``webhooks`` lane: deliveries in the order they arrive."""

    noun = "webhook delivery"
    subject = "delivery_id"

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: WebhookSettings,
        metrics: Metrics,
        endpoints: EndpointMetrics,
        sender: Sender,
        lane: topology.Lane,
    ) -> None:
        self.pool, self.settings, self.metrics = pool, settings, metrics
        self.endpoints, self.sender, self.lane = endpoints, sender, lane
        self.concurrency, self.prefetch = settings.concurrency, settings.prefetch
        self.max_attempts, self.timeout = settings.max_attempts, settings.timeout + 5
        self.retry_base_ms, self.retry_cap_ms = settings.retry_base_ms, settings.retry_cap_ms
        self.disable_after = timedelta(hours=settings.disable_after_hours)

    def place(self, message: Delivery) -> tuple[Frontier, int]:
        return Frontier.FIFO, 0

    async def process(self, message: Delivery, attempt: int) -> str:
        task = messages.decode_webhook(message)
        row = await self.pool.fetchrow(DELIVERY, task.delivery_id)
        if row is None:
            raise Unrecognised(f"no webhook delivery {task.delivery_id}")
        if row["status"] != DeliveryStatus.PENDING:
            return "duplicate"
        if row["endpoint_off"]:
            why = Answer(0, "its endpoint was disabled or deleted")
            await self._settle(row, DeliveryStatus.CANCELLED, attempt - 1, why)
            return "cancelled"
        if row["secret"] is None:  # a callback whose key has no callback secret any more
            why = Answer(0, "its API key has no callback secret")
            await self._settle(row, DeliveryStatus.CANCELLED, attempt - 1, why)
            return "cancelled"
        endpoint = str(row["endpoint_id"] or CALLBACK)
        body = orjson.dumps(row["payload"])
        started = time.perf_counter()
        answer = await self.sender.send(row["url"], str(row["id"]), body, row["secret"])
        self.endpoints.seconds.labels(endpoint).observe(time.perf_counter() - started)
        if answer.delivered:
            self.endpoints.attempts.labels(endpoint, "delivered").inc()
            await self._settle(row, DeliveryStatus.DELIVERED, attempt, answer)
            if row["endpoint_failing"]:  # no write while it succeeds
                await self.pool.execute(SUCCEEDED, row["endpoint_id"])
            return "delivered"
        if answer.status == 410 and row["endpoint_id"] is not None:
            self.endpoints.attempts.labels(endpoint, "gone").inc()
            await self.pool.execute(GONE, row["endpoint_id"])
            await self._settle(row, DeliveryStatus.CANCELLED, attempt, answer)
            return "gone"
        self.endpoints.attempts.labels(endpoint, "failed").inc()
        await self.pool.execute(
            "UPDATE webhook_deliveries SET attempts = $2, last_status = $3, last_error = $4"
            " WHERE id = $1",
            row["id"],
            attempt,
            answer.status or None,
            answer.error and db.storable(answer.error),
        )
        if row["endpoint_id"] is not None and await self.pool.fetchval(
            FAILED, row["endpoint_id"], self.disable_after, "failing"
        ):
            await self._settle(row, DeliveryStatus.CANCELLED, attempt, answer)
            return "disabled"
        raise Undelivered(answer.error or f"HTTP {answer.status}")

    async def _settle(
        self, row: asyncpg.Record, status: DeliveryStatus, attempts: int, answer: Answer
    ) -> None:
        error = answer.error and db.storable(answer.error)
        await self.pool.execute(SETTLE, row["id"], status, attempts, answer.status or None, error)

    async def retrying(self, message: Delivery, error: str, delay_ms: int) -> None:
        """The attempt's answer is recorded already (``process``)."""

    async def failed(self, message: Delivery, error: str) -> None:
        if (delivery_id := messages.order_id_of(message)) is not None:
            await self.pool.execute(
                "UPDATE webhook_deliveries SET status = 'failed', last_error = $2"
                " WHERE id = $1 AND status = 'pending'",
                delivery_id,
                db.storable(error),
            )
