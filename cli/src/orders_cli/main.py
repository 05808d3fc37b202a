"""The ``orders`` command.

    orders submit --item BOOK-1:2 --priority 5      one order, from flags or --file order.json
    orders status ID                                an order's status, attempts and reason
    orders load --count 1000 --rate 200             paced load, progress bar, summary
    orders queues                                   depth, consumers and net rate per queue
    orders dlq list|show|replay|purge               dead letters

The HTTP commands talk to the producer at ``--url`` (``ORDERS_URL``, default
http://localhost:8000) with the API key in ``ORDERS_API_KEY``; ``queues`` and ``dlq`` use
``RABBITMQ_URL`` and ``DATABASE_URL``.
"""

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from consumer import dlq
from orders_cli import load as loadgen
from shared import amqp, hosts, topology
from shared.settings import ConsumerSettings

app = typer.Typer(
    help="Submit orders, watch them, drive load and operate the queues. The HTTP commands use"
    " --url (ORDERS_URL) and the key in ORDERS_API_KEY; queues and dlq use RABBITMQ_URL and"
    " DATABASE_URL.",
    no_args_is_help=True,
    add_completion=False,
)
dlq_app = typer.Typer(help="Inspect, replay or purge dead-lettered messages.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
out, err = Console(), Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="ORDERS_URL", help="the producer's base URL")]
DEFAULT_URL = "http://localhost:8000"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _auth() -> dict[str, str]:
    key = os.environ.get("ORDERS_API_KEY")
    return {"X-API-Key": key} if key else {}


def _request(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    kwargs["headers"] = {**_auth(), **(kwargs.get("headers") or {})}
    try:
        return httpx.request(method, f"{url.rstrip('/')}{path}", timeout=10, **kwargs)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the producer at {url}: {exc}", 2) from None


def _print_response(response: httpx.Response, ok: int) -> None:
    if response.status_code != ok:
        err.print_json(response.text)
        raise typer.Exit(1)
    out.print_json(response.text)


@app.command()
def submit(
    url: Url = DEFAULT_URL,
    item: Annotated[list[str] | None, typer.Option(help="SKU:QUANTITY, repeatable")] = None,
    customer: Annotated[str, typer.Option(help="customer id")] = "cli",
    priority: Annotated[int, typer.Option(min=0, max=9, help="0-9, higher first")] = 0,
    key: Annotated[str | None, typer.Option(help="Idempotency-Key")] = None,
    file: Annotated[Path | None, typer.Option(help="a JSON order instead of flags")] = None,
) -> None:
    """Submit one order; prints the accepted order."""
    if file is not None:
        try:
            content = file.read_bytes()  # as it is: the API says what is wrong with it
        except OSError as exc:
            raise _fail(f"cannot read {file}: {exc.strerror}", 2) from None
    elif item:
        try:
            lines = [
                {"sku": sku, "quantity": int(qty)} for sku, qty in (i.split(":") for i in item)
            ]
        except ValueError:
            raise _fail("items are SKU:QUANTITY, like BOOK-1:2", 2) from None
        content = orjson.dumps({"customer_id": customer, "items": lines, "priority": priority})
    else:
        raise _fail("give --item SKU:QUANTITY (repeatable) or --file order.json", 2)
    headers = {"content-type": "application/json", **({"Idempotency-Key": key} if key else {})}
    _print_response(_request(url, "POST", "/orders", content=content, headers=headers), 202)


@app.command()
def status(order_id: str, url: Url = DEFAULT_URL) -> None:
    """Show an order: status, attempts, reason, timestamps."""
    _print_response(_request(url, "GET", f"/orders/{order_id}"), 200)


@app.command()
def load(
    url: Url = DEFAULT_URL,
    count: Annotated[int, typer.Option(min=1, help="orders to submit")] = 100,
    rate: Annotated[float, typer.Option(min=0.1, help="orders per second")] = 50.0,
    priority_mix: Annotated[str, typer.Option(help="PRIORITY:WEIGHT,...")] = "0:90,9:10",
    item: Annotated[list[str] | None, typer.Option(help="SKU:QUANTITY per order")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for orders to settle; 0: no")] = 60,
) -> None:
    """Drive the HTTP API at a steady rate, then summarise: accepted, errors, latency, outcomes."""
    try:
        mix = loadgen.parse_mix(priority_mix)
        lines = [
            {"sku": s, "quantity": int(q)} for s, q in (i.split(":") for i in item or ["PEN-1:1"])
        ]
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    _request(url, "GET", "/healthz")  # a clear error before the progress bar, if unreachable

    async def go() -> loadgen.Summary:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=_auth()) as client:
            return await loadgen.run(client, count, rate, mix, lines, wait)

    s = asyncio.run(go())
    table = Table(title="load summary", show_header=False)
    table.add_row("sent", str(s.sent))
    table.add_row("accepted", str(len(s.accepted)))
    table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "0")
    table.add_row("throughput", f"{len(s.accepted) / s.elapsed_s:.1f} orders/s")
    for q in (0.50, 0.95, 0.99):
        table.add_row(f"latency p{int(q * 100)}", f"{s.percentile(q):.1f} ms")
    for state, n in sorted(s.final.items()):
        table.add_row(state, str(n))
    out.print(table)
    if s.errors:
        raise typer.Exit(1)


@app.command()
def queues(
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between the two samples")] = 1.0,
) -> None:
    """Depth, consumers and net rate (change in depth per second) of every queue."""
    settings = ConsumerSettings()

    async def sample() -> list[tuple[str, int, int, float]]:
        async def depths(channel: Any) -> dict[str, tuple[int, int]]:
            found = {}
            for q in topology.of(settings.queue_kind).queues:
                result = (await channel.declare_queue(q.name, passive=True)).declaration_result
                found[q.name] = (result.message_count or 0, result.consumer_count or 0)
            return found

        async with await amqp.connect(settings.rabbitmq_url, "orders-cli") as connection:
            channel = await connection.channel()
            first = await depths(channel)
            await asyncio.sleep(interval)
            second = await depths(channel)
        return [(name, n, c, (n - first[name][0]) / interval) for name, (n, c) in second.items()]

    try:
        rows = asyncio.run(sample())
    except Exception as exc:
        raise _fail(
            f"cannot read the queues at {hosts.redact(settings.rabbitmq_url)}: {exc}", 2
        ) from None
    table = Table("queue", "messages", "consumers", "net rate /s")
    for name, n, consumers, rate in rows:
        if ".retry." in name and n == 0 and rate == 0:
            continue  # idle delay levels
        table.add_row(name, str(n), str(consumers), f"{rate:+.1f}")
    out.print(table)


def _dlq(action: str, **kwargs: Any) -> None:
    try:
        code = asyncio.run(dlq.command(ConsumerSettings(), action, **kwargs))
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}", 2) from None
    raise typer.Exit(code)


Limit = Annotated[int, typer.Option(help="most messages to look at")]
Lane = Annotated[str, typer.Option(help="whose dead letters: orders, crawls or webhooks")]


@dlq_app.command("list")
def dlq_list(limit: Limit = 10_000, lane: Lane = "orders") -> None:
    """One JSON line per dead letter: id, attempts, error, failure times."""
    _dlq("list", limit=limit, lane=lane)


@dlq_app.command("show")
def dlq_show(message_id: str, limit: Limit = 10_000, lane: Lane = "orders") -> None:
    """One dead letter in full: headers and body."""
    _dlq("show", message_id=message_id, limit=limit, lane=lane)


@dlq_app.command("replay")
def dlq_replay(
    message_ids: Annotated[
        list[str] | None, typer.Argument(help="message ids (order or crawl page ids)")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="replay every dead letter")] = False,
    limit: Limit = 10_000,
    lane: Lane = "orders",
) -> None:
    """Send dead letters back to work with a fresh attempt count."""
    _dlq("replay", message_ids=message_ids or [], every=every, limit=limit, lane=lane)


@dlq_app.command("purge")
def dlq_purge(
    yes: Annotated[bool, typer.Option("--yes", help="confirm")] = False, lane: Lane = "orders"
) -> None:
    """Drop every dead letter (what they stand for stays failed)."""
    _dlq("purge", yes=yes, lane=lane)


if __name__ == "__main__":
    sys.exit(app())
