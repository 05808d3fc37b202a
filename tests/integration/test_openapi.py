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

from testbed.processes import API_KEY, ARTIFACTS, Producer, Service

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


async def test_the_documented_links_lead_to_answers_that_follow_the_document(
    spawn: Callable[..., Service],
) -> None:
    """Schemathesis's generated requests seldom name an order or a crawl that exists. These make
    some, follow every link the document gives from each answer with the values it names, and
    check each answer against its documented schema."""
    producer = spawn(
        "producer",
        "producer-links",
        CRAWL_ALLOWED_PRIVATE_HOSTS="127.0.0.1",
        WEBHOOK_ALLOWED_PRIVATE_HOSTS="127.0.0.1",
    )
    assert isinstance(producer, Producer)
    await producer.wait_healthy()
    url = f"{producer.base_url}/openapi.json"
    document = await asyncio.to_thread(schemathesis.openapi.from_url, url)
    spec = document.raw_schema
    operations = {
        operation["operationId"]: (path, method.upper())
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    }
    followed: list[str] = []

    async with producer.client() as client:

        async def call(method: str, template: str, status: int, **kwargs: Any) -> Any:
            params = kwargs.pop("params", {})
            response = await client.request(method, template.format(**params), **kwargs)
            assert response.status_code == status, response.text
            document[template][method].validate_response(response)  # raises if it does not match
            body = response.json()
            links = spec["paths"][template][method.lower()]["responses"][str(status)]
            for name, link in links.get("links", {}).items():
                path, target = operations[link["operationId"]]
                values = {
                    parameter: _pointer(body, expression.removeprefix("$response.body#"))
                    for parameter, expression in link["parameters"].items()
                }
                followed.append(name)
                await call(target, path, 200, params=values)
            return body

        await call("PUT", "/inventory/{sku}", 200, params={"sku": "PEN-9"}, json={"available": 5})
        order = {"customer_id": "c-1", "items": [{"sku": "PEN-9", "quantity": 1}], "priority": 3}
        await call("POST", "/orders", 202, json=order)
        await call("POST", "/orders/batch", 202, json={"orders": [order, order]})
        await call("POST", "/crawls", 202, json={"url": "http://127.0.0.1:9/"})
        await call("POST", "/webhooks", 201, json={"url": "http://127.0.0.1:9/hook"})
        await call("GET", "/dashboard/data", 200)
        await call("GET", "/readyz", 200)

    every = [
        name
        for methods in spec["paths"].values()
        for operation in methods.values()
        for response in operation["responses"].values()
        for name in response.get("links", {})
    ]
    assert sorted(followed) == sorted(every)  # each link once


def _pointer(document: Any, pointer: str) -> Any:
    """The value at a JSON Pointer (RFC 6901) without escapes: ``/orders/0/id``."""
    for part in pointer.lstrip("/").split("/"):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document
