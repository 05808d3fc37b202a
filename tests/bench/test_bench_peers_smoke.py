"""``make bench-peers`` run tiny so it cannot rot: every peer's every phase runs beside ours, and
both tables print with a ratio for each peer's figure."""

import re

from bench.peers.__main__ import PEERS
from tests.bench.conftest import Smoke


def test_bench_peers_smoke_prints_every_figure(smoke: Smoke) -> None:
    result = smoke("bench.peers")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    rows = {
        line.split(" | ")[0].removeprefix("| "): line.split(" | ")
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| figure")
    }
    for peer in PEERS:
        for phase in ("enqueue", "web c=16", "web c=64", "drain no-op", "drain effect"):
            cells = rows[f"{peer} {phase}"]
            assert float(cells[1].split(" ")[0].replace(",", "")) > 0, cells
            assert cells[3].endswith("x"), cells  # ours ÷ it
            assert cells[5].strip(" |") in ("yes", "**no**"), cells
        two = rows[f"{peer} drain no-op, 2 processes"]  # no target: only ours ÷ it
        assert float(two[1].split(" ")[0].replace(",", "")) > 0, two
        assert two[3].endswith("x"), two
        waits = rows[f"{peer} priority"]
        assert all(" / " in cell for cell in waits[1:3]), waits
    for ours in (
        "POST /orders c=16",
        "POST /orders c=64",
        "batch submit",
        "drain effect",
        "drain effect, 2 consumers",
    ):
        assert float(rows[f"ours {ours}"][1].split(" ")[0].replace(",", "")) > 0
    assert " / " in rows["ours priority"][1]
    assert "nan" not in result.stdout
    assert re.search(r"^ours: consumers with PREFETCH=\d+ CONCURRENCY=\d+ ", result.stdout, re.M)
