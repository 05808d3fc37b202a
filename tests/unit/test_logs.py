"""JSON log lines: what other programs read (``order_id``, ``event`` and its facts) are fields."""

import logging

import orjson

from shared import logs


def line(message: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("orders", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return orjson.loads(logs.JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_an_event_and_its_facts_are_fields_of_the_line() -> None:
    got = line("consuming orders.work", **logs.event("consuming", queues=["orders.work"]))
    assert got["event"] == "consuming"
    assert got["queues"] == ["orders.work"]
    assert got["message"] == "consuming orders.work"


def test_a_fact_never_replaces_a_field_of_every_line() -> None:
    got = line("x", **logs.event("e", level="fake", message="fake", event="fake"))
    assert (got["level"], got["message"], got["event"]) == ("INFO", "x", "e")


def test_a_line_without_an_event_has_no_event_field() -> None:
    assert "event" not in line("plain")


def test_a_line_logged_while_a_message_is_handled_names_it_in_its_handler_s_field() -> None:
    record = logging.LogRecord("asyncpg", logging.INFO, __file__, 1, "query", (), None)
    token = logs.subject.set(("page_id", "p-1"))
    try:
        logs._WithSubject().filter(record)
    finally:
        logs.subject.reset(token)
    got = orjson.loads(logs.JsonFormatter().format(record))
    assert got["page_id"] == "p-1"
    assert "order_id" not in got
    assert logs.TextFormatter().format(record).endswith("[page_id p-1]")
