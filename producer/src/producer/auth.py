"""API keys and per-key rate limits for the order and crawl endpoints.

A request names its key in ``X-API-Key`` or ``Authorization: Bearer``. Keys are compared in
constant time (their SHA-256 digests, so not even the length leaks), and every configured key is
compared, so timing tells nothing about which one nearly matched. A missing or wrong key is a 401
problem; more than RATE_LIMIT_PER_SECOND requests per key (bursts up to RATE_LIMIT_BURST) is a
429 problem with ``Retry-After``. Limits are per producer process.
"""

import hashlib
import hmac
import math
import time
from dataclasses import dataclass, field

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPBearer

from producer.problems import Problem
from shared.settings import ProducerSettings


def parse_keys(value: str) -> dict[str, bytes]:
    """``"ci:k1, k2"`` as {name: digest}; a key without a name is named by its position."""
    keys: dict[str, bytes] = {}
    for n, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), start=1):
        name, _, key = entry.rpartition(":") if ":" in entry else (f"key{n}", "", entry)
        if not key:
            raise ValueError(f"API_KEYS entry {n} has an empty key")
        keys[name or f"key{n}"] = _digest(key)
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _Bucket:
    tokens: float
    at: float = field(default_factory=time.monotonic)


class Guard:
    """Who is calling, and whether they may call again now."""

    def __init__(self, settings: ProducerSettings) -> None:
        self.keys = parse_keys(settings.api_keys.get_secret_value())
        if not self.keys:
            raise ValueError("API_KEYS is empty: set at least one key (make up generates one)")
        self.rate, self.burst = settings.rate_limit_per_second, settings.rate_limit_burst
        self._buckets: dict[str, _Bucket] = {}

    def identify(self, presented: str) -> str | None:
        """The name of the key presented, or None; the same work whatever is presented."""
        digest, found = _digest(presented), None
        for name, key in self.keys.items():
            if hmac.compare_digest(digest, key):
                found = name
        return found

    def take(self, name: str) -> float:
        """Spend one request of ``name``'s budget; the seconds to wait when there is none."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.setdefault(name, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1:
            return (1 - bucket.tokens) / self.rate
        bucket.tokens -= 1
        return 0.0

    def admit(self, x_api_key: str | None, authorization: str | None) -> str:
        """The name of the key a request presents in these headers, once one request of its
        budget is spent; else the 401 or 429 problem. Every keyed route's check, the fast path's
        too (``services.require_key``, ``fastpath``)."""
        presented = presented_key(x_api_key, authorization)
        name = self.identify(presented) if presented else None
        if name is None:
            raise Problem(
                401,
                "Unauthorized",
                "Send a valid API key in X-API-Key or Authorization: Bearer."
                if presented
                else "This endpoint needs an API key in X-API-Key or Authorization: Bearer.",
                "/problems/unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="orders"'},
            )
        wait = self.take(name)
        if wait > 0:
            raise Problem(
                429,
                "Too many requests",
                f"The rate limit for this key is {self.rate:g} requests per second.",
                "/problems/rate-limited",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        return name


# Either header will do. These declare the keys in the OpenAPI document; ``Guard.admit`` reads the
# headers itself (``presented_key``).
SCHEMES = (
    Security(APIKeyHeader(name="X-API-Key", auto_error=False)),
    Security(HTTPBearer(auto_error=False)),
)


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key a request presents, from its ``X-API-Key`` and ``Authorization`` headers."""
    if x_api_key:
        return x_api_key
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
