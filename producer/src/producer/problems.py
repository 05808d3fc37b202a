"""RFC 9457 problem details: every error the API answers is ``application/problem+json``
(producer/openapi.py documents them; producer/bodies.py refuses bodies before any route)."""

import asyncio
import logging
from http import HTTPStatus
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from shared import urls
from shared.db import NotReplicated

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# The database is down, overloaded or failing over, or a write's outcome is in doubt (the
# connection dropped during COMMIT, or the commit was not replicated): the client tries again,
# with its Idempotency-Key, which finds or makes exactly one order.
UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A pooled connection the server closed while it was idle (a primary shutting down): the
    # next statement on it fails before it is sent (MagicStack/asyncpg#1069).
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    NotReplicated,
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


def install(app: FastAPI) -> None:
    """Answer every error, expected or not, as problem details."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    handled: tuple[type[Exception], ...] = (Problem, urls.Unusable, *UNAVAILABLE, Exception)
    for exc_type in handled:
        app.add_exception_handler(exc_type, _on_error)


def answer(exc: Exception, instance: str) -> Response:
    """The problem details for an error a request raised: its own, 503 when the database is
    unreachable or a write's outcome is in doubt, 500 (logged) for anything unexpected."""
    if isinstance(exc, Problem):
        return exc.response(instance)
    if isinstance(exc, urls.Unusable):  # a crawl's or a webhook's URL
        return Problem(422, exc.title, str(exc), f"/problems/{exc.problem}").response(instance)
    if isinstance(exc, UNAVAILABLE):
        log.warning("database unavailable: %r", exc)
        return Problem(
            503,
            "Service unavailable",
            "The order store cannot be reached, or did not confirm the write. Try again shortly"
            " with the same Idempotency-Key: it finds what was stored, or stores it.",
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
