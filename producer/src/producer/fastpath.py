"""``POST /orders`` without FastAPI's per-request machinery, for a request FastAPI would parse.

FastAPI's middleware, routing, dependency solving and response model cost about half of the
producer's CPU per accepted order (docs/performance-history.md). This ASGI middleware, the outermost
of the app's own, answers a ``POST /orders`` itself when the route would get a valid order: a JSON
body within the size limit that is a valid ``OrderRequest``, and a valid ``Idempotency-Key`` or
none. It then admits it as the route does, with the same two calls: the key check every keyed route
makes (``Guard.admit``: 401, 429) and the order's own (``api.accept``: 503 when overloaded, 422 for
a reused key, else the order stored and the 202). A check added to either is made on both paths.

Any other request it hands on, with the body it read and before it spends any of the caller's
budget, to FastAPI, whose validation answers it exactly as it always has.
"""

import time

import orjson
from pydantic import TypeAdapter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer import api, bodies, problems
from producer.services import Services
from shared.messages import OrderRequest

PATH = "/orders"
_HEADERS = (b"content-length", b"content-type", b"idempotency-key", b"x-api-key", b"authorization")
_KEY: TypeAdapter[str] = TypeAdapter(api.Key)


class SubmitFastPath:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = _first(scope["headers"])
        if bodies.declared_too_large(headers.get(b"content-length", ""), self.max_body_bytes):
            await self.app(scope, receive, send)  # refused unread
            return
        messages = await bodies.read_body(receive, self.max_body_bytes)
        parsed = self._parse(headers, messages)
        if parsed is None:
            await self.app(scope, bodies.replaying(messages, receive), send)
            return
        services = Services.of(scope["app"])
        try:
            owner = services.guard.admit(headers.get(b"x-api-key"), headers.get(b"authorization"))
            response = api.accepted(await api.accept(services, *parsed, owner))
        except Exception as exc:
            response = problems.answer(exc, PATH)
        try:
            await response(scope, receive, send)
        finally:
            services.metrics.request(
                PATH, "POST", response.status_code, time.perf_counter() - started
            )

    def _parse(
        self, headers: dict[bytes, str], messages: list[Message]
    ) -> tuple[OrderRequest, str | None] | None:
        """The order and its key, if FastAPI would find both valid."""
        if messages[-1]["type"] != "http.request" or messages[-1].get("more_body", False):
            return None
        body = b"".join(m.get("body", b"") for m in messages)
        if len(body) > self.max_body_bytes or not bodies.is_json(headers.get(b"content-type", "")):
            return None
        key = headers.get(b"idempotency-key")
        try:
            order = OrderRequest.model_validate(orjson.loads(body))
            if key is not None:
                _KEY.validate_python(key)
        except ValueError:  # orjson's and pydantic's errors both are
            return None
        return order, key


def _first(raw: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The first value of each header the fast path reads (as Starlette's ``Headers.get``)."""
    found: dict[bytes, str] = {}
    for name, value in raw:
        if name in _HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found
