"""Logging for every service: one JSON object per line, or readable text on a terminal.

A line logged while an order is being handled carries its ``order_id``, whoever logs it (our code,
asyncpg or aio-pika), through a context variable set by the worker.
"""

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

order_id: ContextVar[str | None] = ContextVar("order_id", default=None)


class _WithOrder(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "order_id", None) is None:
            record.order_id = order_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "order_id", None):
            line["order_id"] = str(record.order_id)  # type: ignore[attr-defined]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        found = getattr(record, "order_id", None)
        return f"{text} [order {found}]" if found else text


def configure(level: str, fmt: str = "auto") -> None:
    """Route every logger (uvicorn and aio-pika included) through one handler on stderr."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler()
    handler.addFilter(_WithOrder())
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
