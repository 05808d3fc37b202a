"""Logging for every service: one JSON object per line, or readable text on a terminal.

A line logged while a message is being handled names it, whoever logs it (our code, asyncpg or
aio-pika), through a context variable set by the worker: ``order_id`` for an order, ``page_id``
for a crawl task. A line that marks a moment
other programs wait for (the fault suite, an operator's alert) names it in an ``event`` field, with
its facts beside it (``extra=logs.event(...)``), so rewording the message breaks nothing.
"""

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

# The message being handled: the log field that names it, and its id.
subject: ContextVar[tuple[str, str] | None] = ContextVar("subject", default=None)


def event(name: str, **fields: object) -> dict[str, object]:
    """``extra`` for a log call: the line's ``event`` and its facts, as JSON fields."""
    return {"event": name, "event_fields": fields}


class _WithSubject(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "subject", None) is None:
            record.subject = subject.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if found := getattr(record, "subject", None):
            field, id_ = found
            line[field] = id_
        if name := getattr(record, "event", None):
            line["event"] = name
            for key, value in getattr(record, "event_fields", {}).items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        found = getattr(record, "subject", None)
        return f"{text} [{found[0]} {found[1]}]" if found else text


def configure(level: str, fmt: str = "auto") -> None:
    """Route every logger (uvicorn and aio-pika included) through one handler on stderr."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler()
    handler.addFilter(_WithSubject())
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
