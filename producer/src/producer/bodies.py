"""A request's body before any route: refused when too large (413) or not JSON (415), and read
once and handed on (``replaying``) by the middleware that looks at it first (the fast path)."""

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.problems import Problem


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def declared_too_large(content_length: str, limit: int) -> bool:
    """Whether a request's ``Content-Length`` header declares more than ``limit`` bytes. Only
    ASCII digits are a length: "²" is a digit to ``str.isdigit`` but not to ``int``."""
    return content_length.isascii() and content_length.isdigit() and int(content_length) > limit


async def read_body(receive: Receive, limit: int) -> list[Message]:
    """What the client sent of a request's body: up to its end, a disconnect, or past ``limit``
    bytes, as the messages that carried it."""
    messages = [await receive()]
    size = len(messages[0].get("body", b""))
    while (
        messages[-1]["type"] == "http.request"
        and messages[-1].get("more_body", False)
        and size <= limit
    ):
        messages.append(await receive())
        size += len(messages[-1].get("body", b""))
    return messages


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """``receive``, giving back first the ``messages`` already read."""
    pending = messages[::-1]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class BodyGuard:
    """Refuses oversized bodies (413) and bodies that are not JSON (415), before any work."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if declared_too_large(headers.get("content-length", ""), self.max_body_bytes):
            await self._too_large(scope, receive, send)
            return
        messages = await read_body(receive, self.max_body_bytes)
        if messages[-1]["type"] == "http.disconnect":
            return
        body = b"".join(m.get("body", b"") for m in messages)
        if len(body) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        if body and not is_json(headers.get("content-type", "")):
            unsupported = Problem(
                415,
                "Unsupported media type",
                "Send the body as application/json.",
                "/problems/unsupported-media-type",
            )
            await unsupported.response(scope["path"])(scope, receive, send)
            return
        await self.app(scope, replaying([{"type": "http.request", "body": body}], receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = Problem(
            413,
            "Content too large",
            f"The body must not exceed {self.max_body_bytes} bytes.",
            "/problems/too-large",
        )
        await problem.response(scope["path"])(scope, receive, send)
