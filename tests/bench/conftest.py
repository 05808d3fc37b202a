"""The benchmarks' smoke forms: a module run with ``--smoke`` on a vhost and a database of its
own."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]

Smoke = Callable[[str], subprocess.CompletedProcess[str]]


@pytest.fixture
def smoke(rabbitmq_url: str, database_url: str) -> Smoke:
    def run(module: str) -> subprocess.CompletedProcess[str]:
        name = "orders_" + module.replace(".", "_") + "_smoke"
        env = {
            **os.environ,
            "BENCH_RABBITMQ_URL": str(URL(rabbitmq_url).with_path(f"/{name}")),
            "BENCH_DATABASE_URL": str(URL(database_url).with_path(f"/{name}")),
        }
        return subprocess.run(
            [sys.executable, "-m", module, "--smoke"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,  # bench.peers installs the peers' environment on its first run
            check=False,
        )

    return run
