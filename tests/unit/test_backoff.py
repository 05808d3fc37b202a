"""Retry delays: exponential, jittered, capped, and always a declared level."""

import pytest

from consumer.worker import retry_delay_ms
from shared import topology


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_delays_grow_and_stay_within_bounds(rand: float) -> None:
    delays = [retry_delay_ms(a, 1_000, 300_000, lambda: rand) for a in range(1, 12)]
    assert delays == sorted(delays)
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(300_000, 1_000 * 2 ** (attempt - 1))
        assert delay in topology.RETRY_DELAYS_MS
        assert delay <= ceiling
        assert delay >= ceiling / 2 / 2.5  # equal jitter, then one 1-2-5 step down at most
    assert delays[-1] >= 300_000 / 2 / 2.5  # the cap is reached, give or take jitter


def test_jitter_spreads_retries() -> None:
    seen = {retry_delay_ms(6, 1_000, 300_000, lambda r=r / 10: r) for r in range(10)}
    assert len(seen) > 1
