"""The webhook lane's pure parts: its signature, against the specification's reference package,
and the span of its default retries (docs/notifications.md)."""

import time

import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from consumer.webhooks import sign
from consumer.worker import retry_delay_ms
from shared.settings import ConsumerSettings

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the specification's example (not a secret)


def test_a_signature_verifies_with_the_reference_package_and_only_for_its_body() -> None:
    body = orjson.dumps({"type": "order.completed", "data": {"order_id": "o-1"}})
    stamp = int(time.time())
    headers = {
        "webhook-id": "d-1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(WHSEC, "d-1", stamp, body),
    }
    assert Webhook(WHSEC).verify(body, headers)["data"] == {"order_id": "o-1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(body.replace(b"o-1", b"o-2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(body, {**headers, "webhook-id": "d-2"})


def test_the_default_retries_of_a_webhook_span_about_19_hours() -> None:
    webhooks = ConsumerSettings(metrics_port=0).webhooks
    for jitter in (0.0, 0.999999):  # the least and the most the jitter gives
        total_ms = sum(
            retry_delay_ms(a, webhooks.retry_base_ms, webhooks.retry_cap_ms, lambda j=jitter: j)
            for a in range(1, webhooks.max_attempts)
        )
        assert 19 <= total_ms / 3_600_000 < 20
