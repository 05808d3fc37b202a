"""``order_json`` writes an order as ``OrderView`` would, without validating the row again."""

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from producer.api import OrderView, order_json

ROW: dict[str, Any] = {
    "id": uuid.UUID("8d0f6f8e-6b53-4b8e-9d55-111111111111"),
    "status": "accepted",
    "customer_id": "c-1",
    "items": [{"sku": "BOOK-1", "quantity": 2}, {"sku": "PEN-1", "quantity": 1}],
    "priority": 7,
    "attempts": 0,
    "reason": None,
    "next_attempt_at": None,
    "created_at": datetime(2026, 11, 29, 4, 2, 47, 124602, tzinfo=UTC),
    "updated_at": datetime(2026, 11, 29, 4, 2, 47, tzinfo=UTC),  # no microseconds
    "completed_at": None,
    "processed_by": None,
}


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(ROW, id="accepted"),
        pytest.param(
            {
                **ROW,
                "status": "retrying",
                "attempts": 3,
                "reason": "payment gateway unavailable ✗",
                "next_attempt_at": datetime(2027, 1, 1, tzinfo=UTC),
            },
            id="retrying",
        ),
        pytest.param(
            {
                **ROW,
                "status": "completed",
                "completed_at": datetime(2026, 11, 29, 4, 2, 48, 5, tzinfo=UTC),
                "processed_by": "consumer-1",
                "request_hash": b"\x00" * 32,  # read with a reused key; not part of the view
            },
            id="completed",
        ),
    ],
)
def test_order_json_is_the_views_json(row: dict[str, Any]) -> None:
    written = order_json(row)
    assert written == OrderView.model_validate(row).model_dump_json().encode()
    assert orjson.loads(written) == OrderView.model_validate(row).model_dump(mode="json")
