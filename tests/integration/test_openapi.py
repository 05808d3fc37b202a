"""The HTTP API against its own OpenAPI document (``/openapi.json``), checked by Schemathesis.

Generated requests, valid and not, go to every operation of a real producer process; every
answer must be one the document lists (status, content type, body schema, headers), never a 5xx;
a request without a key must be refused; a method a path does not take must be a 405 naming the
ones it does. ``schemathesis.toml`` beside this file says what is left out, and why.
"""

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.integration.processes import API_KEY, ARTIFACTS, Producer, Service

CONFIG = Path(__file__).with_name("schemathesis.toml")


async def test_the_api_answers_as_its_openapi_document_says(
    spawn: Callable[..., Service],
) -> None:
    producer = spawn("producer", "producer-openapi", DEMO_CATALOGUE="true")
    assert isinstance(producer, Producer)
    await producer.wait_healthy()
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--no-color",
        f"--config-file={CONFIG}",
        "run",
        f"{producer.base_url}/openapi.json",
        f"--header=X-API-Key: {API_KEY}",
        "--max-examples=30",
        "--seed=1",  # the same requests every run
    ]
    run = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=ARTIFACTS,  # where it keeps its cache of failing cases
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
    assert producer.process.poll() is None, producer.log()
