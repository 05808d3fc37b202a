"""The crawler end to end: a generated site on 127.0.0.1, the real API, broker and database."""

import asyncio
import itertools
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from tests.integration.conftest import ApiFactory, WorkerFactory, wait_until
from tests.integration.site import Site, generated, tree
from tests.integration.test_failures import dlq_cli

LOCAL = {"crawl_allowed_private_hosts": "127.0.0.1", "crawl_host_delay_ms": 0}
JSON = {"content-type": "application/json"}
WORKER = {**LOCAL, "crawl_max_bytes": 200_000, "crawl_max_attempts": 3}


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    started = await generated().start()
    yield started
    await started.stop()


async def start_crawl(api: httpx.AsyncClient, url: str, **body: Any) -> str:
    response = await api.post("/crawls", json={"url": url, **body})
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/crawls/{response.json()['id']}"
    return str(response.json()["id"])


async def finished(api: httpx.AsyncClient, crawl_id: str, timeout: float = 90) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        view: dict[str, Any] = (await api.get(f"/crawls/{crawl_id}")).json()
        return view if view["status"] != "running" else None

    result: dict[str, Any] = await wait_until(done, timeout, f"crawl {crawl_id} to finish")
    return result


async def pages_of(api: httpx.AsyncClient, crawl_id: str) -> dict[str, dict[str, Any]]:
    response = await api.get(f"/crawls/{crawl_id}/pages", params={"limit": 10_000})
    assert response.status_code == 200, response.text
    return {p["url"]: p for p in response.json()}


def paths(site: Site, pages: dict[str, dict[str, Any]]) -> dict[str, int]:
    prefix = site.url("")
    return {url.removeprefix(prefix): p["depth"] for url, p in pages.items()}


async def test_crawl_finds_exactly_the_reachable_pages_each_fetched_once(
    site: Site, start_api: ApiFactory, start_worker: WorkerFactory, conn: asyncpg.Connection
) -> None:
    api = await start_api(**LOCAL)
    await start_worker(**WORKER)
    crawl_id = await start_crawl(api, site.root, max_depth=3, max_pages=10_000)
    view = await finished(api, crawl_id)
    pages = await pages_of(api, crawl_id)

    expected = site.reachable(3)
    assert view["status"] == "completed"
    assert paths(site, pages) == expected
    assert view["pages_found"] == len(expected) == len(pages)
    # Every page was fetched once: duplicates and redeliveries never fetch again.
    assert set(site.hits) == set(expected) - {"/private/secret"}
    assert {p: n for p, n in site.hits.items() if n != 1} == {"/flaky": 3}
    assert view["queued"] == view["cancelled"] == 0
    late = await api.delete(f"/crawls/{crawl_id}")
    assert late.status_code == 409  # a completed crawl has nothing left to cancel
    assert late.json()["type"] == "/problems/conflict"
    assert view["fetched"] + view["failed"] + view["blocked"] == len(pages)

    by_path = {path: pages[site.url(path)] for path in expected}
    assert by_path["/"]["title"] == "page /"
    assert by_path["/"]["links"] == len(site.links["/"]) + 3  # a fragment, mailto, off-site
    assert by_path["/"]["http_status"] == 200
    assert by_path["/missing/1"]["status"] == "failed"
    assert by_path["/missing/1"]["error"] == "HTTP 404 Not Found"
    assert by_path["/gone"]["http_status"] == 410
    assert by_path["/huge"]["status"] == "failed"
    assert "larger than 200000 bytes" in by_path["/huge"]["error"]
    assert by_path["/file.bin"]["status"] == "fetched"
    assert by_path["/file.bin"]["content_type"] == "application/octet-stream"
    assert by_path["/file.bin"]["links"] is None
    assert by_path["/private/secret"]["status"] == "blocked"
    assert by_path["/loop/a"]["http_status"] == by_path["/loop/b"]["http_status"] == 302
    assert by_path["/chain/5"]["status"] == "failed"
    assert "more than 5 redirects" in by_path["/chain/5"]["error"]
    # A server error is retried, then recorded with its reason, not retried forever.
    assert by_path["/flaky"]["status"] == "failed"
    assert by_path["/flaky"]["attempts"] == 3
    assert "HTTP 503" in by_path["/flaky"]["error"]
    dead = await conn.fetchval("SELECT count(*) FROM crawl_pages WHERE url LIKE '%/flaky'")
    assert dead == 1
    stored = await conn.fetchval(
        "SELECT count(*) - count(DISTINCT url) FROM crawl_pages WHERE crawl_id = $1", crawl_id
    )
    assert stored == 0


async def test_max_pages_caps_the_crawl(
    site: Site, start_api: ApiFactory, start_worker: WorkerFactory
) -> None:
    api = await start_api(**LOCAL)
    await start_worker(**WORKER)
    crawl_id = await start_crawl(api, site.root, max_depth=5, max_pages=25)
    view = await finished(api, crawl_id)
    found = paths(site, await pages_of(api, crawl_id))
    assert view["status"] == "completed"
    assert len(found) == view["pages_found"] == 25
    reachable = site.reachable(5)
    assert set(found) <= set(reachable)
    assert sum(site.hits.values()) <= 25 + 2  # /flaky may be tried again


async def test_visit_order_follows_the_crawls_frontier(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    each_kind: dict[str, Any],
) -> None:
    """One consumer, one runner, a window of 50: fifo and priority go level by level, lifo
    goes deep at once; on either queue kind (a priority crawl's tasks spread over the quorum
    kind's bands, the others wait in one)."""
    api = await start_api(**LOCAL, **each_kind)
    await start_worker(**LOCAL, **each_kind, crawl_concurrency=1, crawl_prefetch=50)
    site = tree(fanout=4, depth=3)
    site.delay = 0.03  # a fetch takes longer than the relay: children arrive during the next one
    await site.start()
    try:
        depths: dict[str, list[int]] = {}
        for order in ("fifo", "priority", "lifo"):
            crawl_id = await start_crawl(api, site.root, max_depth=3, order=order)
            assert (await finished(api, crawl_id))["status"] == "completed"
            rows = await conn.fetch(
                "SELECT depth FROM crawl_pages WHERE crawl_id = $1 ORDER BY visit", crawl_id
            )
            depths[order] = [r["depth"] for r in rows]
    finally:
        await site.stop()

    assert len(depths["fifo"]) == 1 + 4 + 16 + 64
    assert depths["fifo"] == sorted(depths["fifo"])  # breadth-first
    assert depths["priority"] == sorted(depths["priority"])  # shallow first
    # Depth-first within the window: the bottom level is reached long before a breadth-first
    # crawl would finish level 1 (its first depth-3 visit is the 22nd). A page's children
    # arrive just after the runner has taken its next task, so each level costs about two
    # visits: 0, 1, 1, 2, 2, 3 (docs/crawler.md).
    assert depths["lifo"].index(3) <= 2 * 3 + 1
    assert depths["lifo"] != sorted(depths["lifo"])


async def test_politeness_limits_concurrency_and_spaces_requests_per_host(
    start_api: ApiFactory, start_worker: WorkerFactory
) -> None:
    api = await start_api(**LOCAL)
    await start_worker(
        crawl_allowed_private_hosts="127.0.0.1",
        crawl_concurrency=8,
        crawl_host_concurrency=2,
        crawl_host_delay_ms=50,
    )
    site = tree(fanout=6, depth=2)
    site.delay = 0.2  # slower than the delay: two requests overlap, never three
    await site.start()
    try:
        crawl_id = await start_crawl(api, site.root, max_depth=2)
        assert (await finished(api, crawl_id))["status"] == "completed"
    finally:
        await site.stop()
    starts = sorted(start for start, _, _ in site.spans)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 1 + 6 + 36 + 1  # and robots.txt
    assert site.most_active == 2
    assert min(gaps) >= 0.045


async def test_cancel_stops_a_crawl(
    site: Site, start_api: ApiFactory, start_worker: WorkerFactory
) -> None:
    site.delay = 0.05
    api = await start_api(**LOCAL)
    await start_worker(**WORKER, crawl_concurrency=1)
    crawl_id = await start_crawl(api, site.root, max_depth=5, max_pages=10_000)
    await wait_until(lambda: _fetched_at_least(api, crawl_id, 5), 30, "a few pages to be fetched")
    response = await api.delete(f"/crawls/{crawl_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["cancelled"] > 0
    hits = sum(site.hits.values())
    await asyncio.sleep(1)
    assert sum(site.hits.values()) <= hits + 1  # at most the page being fetched
    again = await api.delete(f"/crawls/{crawl_id}")
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"


async def _fetched_at_least(api: httpx.AsyncClient, crawl_id: str, n: int) -> bool:
    return bool((await api.get(f"/crawls/{crawl_id}")).json()["fetched"] >= n)


async def test_crawl_survives_consumers_killed_mid_crawl(
    site: Site, spawn, conn: asyncpg.Connection
) -> None:
    site.delay = 0.03
    env = {"CRAWL_ALLOWED_PRIVATE_HOSTS": "127.0.0.1", "CRAWL_HOST_DELAY_MS": "0"}
    producer = spawn("producer", "producer-crawl", **env)
    await producer.wait_healthy()
    first = [spawn("consumer", f"consumer-crawl-{i}", **env) for i in range(2)]
    for consumer in first:
        await consumer.wait_for_event("consuming")
    async with producer.client() as api:
        crawl_id = await start_crawl(api, site.root, max_depth=3, max_pages=10_000)
        await wait_until(lambda: _fetched_at_least(api, crawl_id, 15), 30, "15 pages")
        for consumer in first:
            consumer.signal(signal.SIGKILL)  # mid-fetch: their windows go back to the queue
        await asyncio.sleep(0.5)
        spawn("consumer", "consumer-crawl-late", **env)
        view = await finished(api, crawl_id, 120)
        pages = await pages_of(api, crawl_id)
    assert view["status"] == "completed"
    assert paths(site, pages) == site.reachable(3)
    stored = await conn.fetchval(
        "SELECT count(*) - count(DISTINCT url) FROM crawl_pages WHERE crawl_id = $1", crawl_id
    )
    assert stored == 0
    retaken = await conn.fetchval(
        "SELECT count(*) FROM crawl_pages"
        " WHERE crawl_id = $1 AND attempts > 1 AND url NOT LIKE '%/flaky'",
        crawl_id,
    )
    assert retaken >= 1  # the kill was real: some pages were taken over


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:9/", "/problems/address-refused"),
        ("http://10.1.2.3/", "/problems/address-refused"),
        ("http://169.254.169.254/latest/meta-data/", "/problems/address-refused"),
        ("http://[::1]:8080/", "/problems/address-refused"),
        ("http://localhost/", "/problems/address-refused"),
        ("ftp://example.com/", "/problems/validation-error"),
        ("/relative", "/problems/validation-error"),
        ("http://no-such-host.invalid/", "/problems/unknown-host"),
    ],
)
async def test_a_crawl_of_a_private_address_is_refused(
    start_api: ApiFactory, conn: asyncpg.Connection, url: str, problem: str
) -> None:
    api = await start_api()  # no allow-list
    response = await api.post("/crawls", json={"url": url})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == problem
    assert await conn.fetchval("SELECT count(*) FROM crawls") == 0


async def test_links_and_redirects_to_private_addresses_are_refused_at_fetch(
    start_api: ApiFactory, start_worker: WorkerFactory
) -> None:
    """127.0.0.1 is allowed, ``localhost`` (also loopback) is not: a link to it, and a
    redirect to it, fail at the consumer after resolution."""
    site = Site(robots="")
    await site.start()
    sneaky = f"http://localhost:{site.port}/inside"
    site.links["/"] = ["/jump", sneaky]
    site.redirects["/jump"] = sneaky
    site.links["/inside"] = []
    api = await start_api(**LOCAL)
    await start_worker(**LOCAL)
    try:
        crawl_id = await start_crawl(
            api, site.root, max_depth=2, allowed_hosts=["127.0.0.1", "localhost"]
        )
        assert (await finished(api, crawl_id))["status"] == "completed"
        pages = await pages_of(api, crawl_id)
    finally:
        await site.stop()
    assert pages[sneaky]["status"] == "failed"
    assert "non-public address" in pages[sneaky]["error"]
    assert "/inside" not in site.hits


async def test_crawl_validation_and_lookup_errors_are_problems(
    start_api: ApiFactory, site: Site
) -> None:
    api = await start_api(**LOCAL)
    for body in (
        {"url": site.root, "order": "random"},
        {"url": site.root, "max_depth": -1},
        {"url": site.root, "max_pages": 0},
        {"url": site.root, "surprise": 1},
        {"url": site.root, "max_depth": "2"},
        {"url": site.root, "allowed_hosts": ["bad host"]},
    ):
        response = await api.post("/crawls", json=body)
        assert response.status_code == 422, body
        assert response.json()["type"] == "/problems/validation-error"
    missing = "00000000-0000-0000-0000-000000000000"
    for response in (
        await api.get(f"/crawls/{missing}"),
        await api.get(f"/crawls/{missing}/pages"),
        await api.delete(f"/crawls/{missing}"),
    ):
        assert response.status_code == 404
        assert response.json()["type"] == "/problems/not-found"
    first = await api.post("/crawls", json={"url": site.root}, headers={"Idempotency-Key": "k1"})
    again = await api.post("/crawls", json={"url": site.root}, headers={"Idempotency-Key": "k1"})
    other = await api.post(
        "/crawls", json={"url": site.root, "max_depth": 1}, headers={"Idempotency-Key": "k1"}
    )
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert other.status_code == 422
    assert other.json()["type"] == "/problems/idempotency-key-reused"


async def test_text_postgresql_cannot_store_is_refused_or_made_storable(
    start_api: ApiFactory, start_worker: WorkerFactory, conn: asyncpg.Connection
) -> None:
    """NUL or a lone surrogate in a crawl URL is a 422, never a 500; on a crawled page, titles,
    links and errors are stored with them replaced; a link aiohttp cannot parse fails at once."""
    api = await start_api(**LOCAL)
    for url in ("http://93.184.216.34/a\u0000b", "http://93.184.216.34/\ud800", "http://a\u0007/"):
        body = json.dumps({"url": url}).encode()  # escaped: JSON may carry what UTF-8 cannot
        response = await api.post("/crawls", content=body, headers=JSON)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["type"] == "/problems/validation-error"
    response = await api.post(
        "/crawls", json={"url": "http://93.184.216.34/", "allowed_hosts": ["a\u0000b"]}
    )
    assert response.status_code == 422

    site = Site()
    await site.start()
    numeric = f"http://2130706433:{site.port}/"  # 127.0.0.1 as one number: aiohttp refuses it
    site.html["/"] = (
        f"<title>nul&#0;here\x00and&#xD800;</title><a href='/x\x00y'>x</a><a href='{numeric}'>n</a>"
    ).encode()
    await start_worker(**WORKER)
    try:
        crawl = await start_crawl(api, site.root, allowed_hosts=["127.0.0.1", "2130706433"])
        view = await finished(api, crawl)
        pages = await pages_of(api, crawl)
    finally:
        await site.stop()
    assert view["status"] == "completed"
    root = pages[site.root]
    assert root["status"] == "fetched"
    assert root["title"].startswith("nul")
    assert "\x00" not in root["title"]
    assert len(pages) == 3
    odd = pages[numeric]
    assert (odd["status"], odd["attempts"]) == ("failed", 1)
    assert odd["error"].startswith("invalid URL")


async def test_a_dead_lettered_page_can_be_replayed_and_the_crawl_reopens(
    site: Site,
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    database_url: str,
    rabbitmq_url: str,
) -> None:
    api = await start_api(**LOCAL)
    await start_worker(**WORKER)
    crawl_id = await start_crawl(api, site.root, max_depth=1, max_pages=10_000)
    before = await finished(api, crawl_id)
    assert before["status"] == "completed"
    flaky = (await pages_of(api, crawl_id))[site.url("/flaky")]
    assert flaky["status"] == "failed"

    listed = await asyncio.to_thread(
        dlq_cli, database_url, rabbitmq_url, "list", "--lane", "crawls"
    )
    assert listed.returncode == 0, listed.stderr
    letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert len(letters) == 1
    assert letters[0]["type"] == "crawl.task"
    assert letters[0]["attempt"] == 3
    assert "HTTP 503" in letters[0]["error_message"]
    orders = await asyncio.to_thread(dlq_cli, database_url, rabbitmq_url, "list")
    assert orders.stdout == ""  # the order lane's DLQ is another queue

    del site.statuses["/flaky"]  # the server is fixed
    site.links["/flaky"] = ["/p/3"]
    replayed = await asyncio.to_thread(
        dlq_cli, database_url, rabbitmq_url, "replay", "--lane", "crawls", "--all"
    )
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.split() == [letters[0]["message_id"]]
    view = await finished(api, crawl_id)
    assert view["status"] == "completed"
    assert view["failed"] == before["failed"] - 1
    assert view["pages_found"] == before["pages_found"]  # /p/3 is at depth 2: not followed
    page = (await pages_of(api, crawl_id))[site.url("/flaky")]
    assert page["status"] == "fetched"
    assert page["http_status"] == 200
    assert site.hits["/flaky"] == 4
