"""The OpenAPI document lists every operation's error answers as RFC 9457 problem details."""

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from producer.problems import MEDIA_TYPE, ProblemDetails

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


_SCHEMAS = "#/components/schemas/"


def document(app: FastAPI) -> None:
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
                    _document_stream(operation)
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


def _document_stream(operation: dict[str, Any]) -> None:
    """An event stream as OpenAPI 3.1 can say it: FastAPI describes each event with 3.2's
    ``itemSchema``, which this document's version does not have."""
    ok = operation["responses"].get("200", {})
    stream = ok.get("content", {}).get("text/event-stream")
    if stream is not None:
        stream["schema"] = {  # one event's fields, as Schemathesis reads a stream's schema
            **stream.pop("itemSchema", {"type": "object"}),
            "description": "a server-sent event; its data is a JSON object (docs/notifications.md)",
        }
        ok["description"] = "a stream of server-sent events"
