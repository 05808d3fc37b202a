"""RFC 9457 problem details: every error the API answers is ``application/problem+json``, and
the OpenAPI document lists each operation's errors so."""

import asyncio
import logging
from http import HTTPStatus
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# The database is down or overloaded: the client may try again, nothing was stored.
UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


class Problem(Exception):
    """An error answered as problem details."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        type_: str,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.type = status, title, detail, type_
        self.headers = headers or {}
        self.extensions = extensions

    def response(self, instance: str) -> Response:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extensions,
        }
        return Response(orjson.dumps(body), self.status, self.headers, MEDIA_TYPE)


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the field")
    msg: str
    type: str


class ProblemDetails(BaseModel):
    """Every error answer's body (RFC 9457), as the OpenAPI document shows it."""

    model_config = ConfigDict(title="Problem", extra="allow")  # extension members may follow

    type: str = Field(description="the kind of problem, a path under /problems/")
    title: str
    status: int
    detail: str = Field(description="what went wrong with this request, for a person")
    instance: str = Field(description="the request's path")
    errors: list[FieldError] | None = Field(
        None, description="a 400 or 422 for a request that breaks the schema: what broke it"
    )


# The errors a request may meet before its route runs, and what they mean on this API.
_GENERAL = {
    400: "malformed JSON",
    401: "no API key, or an unknown one",
    413: "the body is larger than MAX_BODY_BYTES",
    415: "the body is not JSON",
    422: "the request breaks the schema",
    429: "this key's rate limit is spent: see Retry-After",
    503: "the database is unreachable: see Retry-After",
}
# The headers every answer with that status carries.
_RETRY_AFTER = {"Retry-After": "seconds to wait before trying again"}
_HEADERS = {
    401: {"WWW-Authenticate": 'the scheme to use: Bearer realm="orders"'},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Answer every error, expected or not, as problem details, and document them so."""
    _document(app)
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    handled: tuple[type[Exception], ...] = (Problem, *UNAVAILABLE, Exception)
    for exc_type in handled:
        app.add_exception_handler(exc_type, _on_error)


def answer(exc: Exception, instance: str) -> Response:
    """The problem details for an error a request raised: its own, 503 when the database is
    unreachable (nothing was stored), 500 (logged) for anything unexpected."""
    if isinstance(exc, Problem):
        return exc.response(instance)
    if isinstance(exc, UNAVAILABLE):
        log.warning("database unavailable: %r", exc)
        return Problem(
            503,
            "Service unavailable",
            "The order store cannot be reached; nothing was stored. Try again shortly.",
            "/problems/unavailable",
            headers={"Retry-After": "1"},
        ).response(instance)
    log.error("unexpected error", exc_info=exc)
    return Problem(
        500,
        "Internal server error",
        "An unexpected error; the server logged it. Try again later.",
        "/problems/internal-server-error",
    ).response(instance)


_SCHEMAS = "#/components/schemas/"


def _document(app: FastAPI) -> None:
    """Make the OpenAPI document list every operation's error answers as problem details: its
    own (404, 409, …; FastAPI's 422 for a route with parameters) and those of the layers in
    front of it (a body: 400, 413, 415, 422; an API key: 401, 429, and 503 from the database
    behind it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        document = generate()  # FastAPI keeps it after the first call
        if fresh:
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            problem = ProblemDetails.model_json_schema(ref_template=_SCHEMAS + "{model}")
            schemas.update(problem.pop("$defs", {}))
            schemas["Problem"] = problem
            for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's own 422, unused
                schemas.pop(name, None)
            for path in document["paths"].values():
                for operation in path.values():
                    _document_errors(operation)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(operation: dict[str, Any]) -> None:
    statuses: set[int] = set()
    if "requestBody" in operation:
        statuses |= {400, 413, 415, 422}
    if operation.get("security"):
        statuses |= {401, 429, 503}
    responses = operation["responses"]
    for status in statuses:
        responses.setdefault(str(status), {})
    for code, response in responses.items():
        status = int(code)
        if status >= 400:
            phrase = HTTPStatus(status).phrase  # FastAPI's description when a route gives none
            if response.get("description") in (None, phrase, "Validation Error"):
                response["description"] = _GENERAL.get(status, phrase)
            response["content"] = {MEDIA_TYPE: {"schema": {"$ref": _SCHEMAS + "Problem"}}}
            if headers := _HEADERS.get(status):
                response["headers"] = {
                    name: {"description": text, "required": True, "schema": {"type": "string"}}
                    for name, text in headers.items()
                }


async def _on_error(request: Request, exc: Exception) -> Response:
    return answer(exc, request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        problem = _malformed(errors)
    else:
        problem = Problem(
            422,
            "Invalid request",
            "The request does not follow the schema.",
            "/problems/validation-error",
            errors=errors,
        )
    return problem.response(request.url.path)


def _malformed(errors: list[dict[str, Any]]) -> Problem:
    return Problem(
        400,
        "Malformed JSON",
        "The request body is not valid JSON.",
        "/problems/malformed-json",
        errors=errors,
    )


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI's answer to a JSON body that is not UTF-8: the same as to any bad JSON.
        error = {"loc": ["body"], "msg": "not UTF-8", "type": "json_invalid"}
        return _malformed([error]).response(request.url.path)
    title, path = _reason(exc.status_code), request.url.path
    if exc.status_code == 404:  # no route, or a path parameter that is not of its type
        detail = f"Nothing is found at {path}."
    elif exc.status_code == 405:  # Starlette names the methods of one route; a path may have more
        headers["Allow"] = ", ".join(_methods(request))
        detail = f"{path} does not take {request.method}; it takes {headers['Allow']}."
    elif isinstance(exc.detail, str) and exc.detail != title:
        detail = exc.detail
    else:
        detail = f"The request was answered {exc.status_code} {title}."
    kind = "/problems/" + title.lower().replace(" ", "-")  # /problems/not-found, ...
    return Problem(exc.status_code, title, detail, kind, headers=headers).response(path)


def _methods(request: Request) -> list[str]:
    """The methods the request's path answers, over all its routes."""
    return [
        method
        for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.routes
        )
    ]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


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
