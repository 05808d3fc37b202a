"""The schema's files: numbered without gaps, and every ``:name`` in them replaced."""

import re

from shared import db


def test_the_files_are_numbered_one_to_n_in_the_order_they_run() -> None:
    names = sorted(f.name for f in db.SCHEMA.iterdir() if f.name.endswith(".sql"))
    assert [int(name[:4]) for name in names] == list(range(1, len(db.MIGRATIONS) + 1))


def test_every_variable_is_replaced_by_its_constant() -> None:
    for sql in db.MIGRATIONS:
        assert not re.search(r"(?<![:\w]):[a-z_]+", sql)
    reservation, notify = db.MIGRATIONS[7], db.MIGRATIONS[6]
    assert reservation.count(f"IN ({db.FINAL_SQL})") == 2
    assert f"pg_notify('{db.OUTBOX_CHANNEL}'" in notify


def test_casts_and_unknown_names_are_left_alone() -> None:
    assert db._render("SELECT $1::jsonb, :nobody") == "SELECT $1::jsonb, :nobody"
