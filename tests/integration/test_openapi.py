"""The HTTP API against its own OpenAPI document (``/openapi.json``), checked by Schemathesis.

Generated requests, valid and not, go to every operation of a real producer process; every
answer must be one the document lists (status, content type, body schema, headers), never a 5xx;
a request without a key must be refused; a method a path does not take must be a 405 naming the
ones it does. ``schemathesis.toml`` beside this file says what is left out, and why. Then the
document's links are followed by hand, so that the answers about real orders and crawls are
checked against it too.
"""

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis

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


async def test_the_answers_along_the_documented_links_follow_the_document(
    spawn: Callable[..., Service],
) -> None:
    """Schemathesis's generated requests seldom name an order or a crawl that exists; these do,
    following the document's links, and each answer must match its documented schema."""
    producer = spawn("producer", "producer-links", CRAWL_ALLOWED_PRIVATE_HOSTS="127.0.0.1")
    assert isinstance(producer, Producer)
    await producer.wait_healthy()
    document = await asyncio.to_thread(
        schemathesis.openapi.from_url, f"{producer.base_url}/openapi.json"
    )

    async def call(method: str, template: str, status: int, **kwargs: Any) -> Any:
        path = template.format(**kwargs.pop("params", {}))
        response = await client.request(method, path, **kwargs)
        assert response.status_code == status, response.text
        document[template][method].validate_response(response)  # raises if it does not match
        return response.json()

    async with producer.client() as client:
        await call("PUT", "/inventory/{sku}", 200, params={"sku": "PEN-9"}, json={"available": 5})
        await call("GET", "/inventory/{sku}", 200, params={"sku": "PEN-9"})
        order = {"customer_id": "c-1", "items": [{"sku": "PEN-9", "quantity": 1}], "priority": 3}
        made = await call("POST", "/orders", 202, json=order)
        await call("GET", "/orders/{order_id}", 200, params={"order_id": made["id"]})
        batch = await call("POST", "/orders/batch", 202, json={"orders": [order, order]})
        await call("GET", "/orders/{order_id}", 200, params={"order_id": batch["orders"][1]["id"]})
        crawl = await call("POST", "/crawls", 202, json={"url": "http://127.0.0.1:9/"})
        ids = {"crawl_id": crawl["id"]}
        await call("GET", "/crawls/{crawl_id}", 200, params=ids)
        await call("GET", "/crawls/{crawl_id}/pages", 200, params=ids)
        await call("DELETE", "/crawls/{crawl_id}", 200, params=ids)
        await call("GET", "/dashboard/data", 200)
        await call("GET", "/readyz", 200)
