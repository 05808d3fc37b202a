"""``POST /orders`` without FastAPI's per-request machinery, for a request with nothing to refuse.

FastAPI's middleware, routing, dependency solving and response model cost about half of the
producer's CPU per accepted order (docs/performance-history.md). This ASGI middleware, the outermost
of the app's own, answers a ``POST /orders`` itself when every check the route makes passes: a JSON
body within the size limit that is a valid order, a valid ``Idempotency-Key`` or none, a known API
key with budget left, and an outbox that is not overloaded. It then stores the order as the route
does (``api.accept``) and answers the same 202.

Any request it does not take, it hands on, with the body it read, to FastAPI, whose route and
handlers answer it exactly as they always have: every refusal keeps one source. A request it
hands on has cost nothing: the rate limit's token is the last thing it takes.
"""

import time

import orjson
from pydantic import TypeAdapter
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer import api, bodies, problems
from producer.auth import Guard, presented_key
from producer.metrics import Metrics
from shared.messages import NewOrder

PATH = "/orders"
_HEADERS = (b"content-length", b"content-type", b"idempotency-key", b"x-api-key", b"authorization")
_KEY: TypeAdapter[str] = TypeAdapter(api.Key)


class SubmitFastPath:
    def __init__(self, app: ASGIApp, state: State, max_body_bytes: int) -> None:
        self.app, self.state, self.max_body_bytes = app, state, max_body_bytes

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
        admitted = self._admit(headers, messages)
        if admitted is None:
            await self.app(scope, bodies.replaying(messages, receive), send)
            return
        try:
            response = api.accepted(await api.accept(self.state, *admitted))
        except Exception as exc:
            response = problems.answer(exc, PATH)
        try:
            await response(scope, receive, send)
        finally:
            metrics: Metrics = self.state.metrics
            metrics.request(PATH, "POST", response.status_code, time.perf_counter() - started)

    def _admit(
        self, headers: dict[bytes, str], messages: list[Message]
    ) -> tuple[NewOrder, str | None] | None:
        """The order and its key, if the route would accept them; the caller's token is spent."""
        if messages[-1]["type"] != "http.request" or messages[-1].get("more_body", False):
            return None
        body = b"".join(m.get("body", b"") for m in messages)
        if len(body) > self.max_body_bytes or not bodies.is_json(headers.get(b"content-type", "")):
            return None
        key = headers.get(b"idempotency-key")
        try:
            order = NewOrder.model_validate(orjson.loads(body))
            if key is not None:
                _KEY.validate_python(key)
        except ValueError:  # orjson's and pydantic's errors both are
            return None
        guard: Guard = self.state.guard
        presented = presented_key(headers.get(b"x-api-key"), headers.get(b"authorization"))
        name = guard.identify(presented) if presented else None
        if name is None or self.state.backlog.overloaded or guard.take(name) > 0:
            return None
        return order, key


def _first(raw: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The first value of each header the fast path reads (as Starlette's ``Headers.get``)."""
    found: dict[bytes, str] = {}
    for name, value in raw:
        if name in _HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found
