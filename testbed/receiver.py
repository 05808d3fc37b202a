"""A webhook receiver on 127.0.0.1, as docs/notifications.md tells receivers to be: it verifies
each request with the ``standardwebhooks`` package (the reference) and records what came.

Each path has its own secret (an endpoint's, the key's callback secret). ``answer`` decides the HTTP
status of each request from its path and webhook-id (200 by default); ``stop`` and ``start`` take it
down and bring it back on the same port.
"""

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from testbed.processes import free_port

FINAL = ("completed", "rejected", "failed")


@dataclass(frozen=True)
class Received:
    path: str
    webhook_id: str
    payload: dict[str, Any]
    status: int  # what the receiver answered

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Receiver:
    secrets: dict[str, str] = field(default_factory=dict)  # path -> whsec_...
    received: list[Received] = field(default_factory=list)  # verified requests, in arrival order
    forged: int = 0  # requests whose signature did not verify
    arrived: dict[str, float] = field(default_factory=dict)  # order id -> its final status's time
    answer: Callable[[str, str], int] = lambda _path, _id: 200
    port: int = field(default_factory=free_port)
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/{path:.*}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        secret = self.secrets.get(request.path)
        try:
            if secret is None:
                raise WebhookVerificationError("no secret for this path")
            payload = Webhook(secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.forged += 1
            return web.Response(status=401)
        webhook_id = request.headers["webhook-id"]
        status = self.answer(request.path, webhook_id)
        received = Received(request.path, webhook_id, payload, status)
        self.received.append(received)
        data = payload["data"]
        if received.delivered and data["status"] in FINAL:
            self.arrived.setdefault(data["order_id"], time.time())
        return web.Response(status=status)

    def ids(self) -> list[str]:
        return [r.webhook_id for r in self.received]

    def final(self) -> dict[str, str]:
        """Each order's final status as delivered (answered 2xx): order id -> status."""
        return {
            r.payload["data"]["order_id"]: r.payload["data"]["status"]
            for r in self.received
            if r.delivered and r.payload["data"]["status"] in FINAL
        }
