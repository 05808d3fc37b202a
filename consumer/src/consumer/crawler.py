"""What handling a crawl task means: claim the page, fetch it, store it and queue what it links to.

Each step is safe to repeat, like an order's:

- **claim**: ``queued`` → ``fetching`` with a lease. A duplicate task finds the page already
  settled and is acked with no effect; one for a page another consumer is fetching is retried
  later. A redelivery (the holder died) or a retry (the holder gave up) takes the page over.
- **settle**: one transaction, serialised on the crawl's row: the page's result, the new pages
  it links to (the unique ``(crawl_id, url)`` keeps each URL once; their tasks are published by
  the producer's outbox relay), and ``completed`` when no page is left queued or being fetched.

Depth is the shortest distance from the root. When a page turns out to be reachable by a shorter
path than the one it was found by, its depth is lowered, and a page already fetched passes the
lower depth on to the pages it links to, so the page set is exactly the reachable set within
``max_depth`` whatever order the pages were visited in. A redirect is a page whose one link is
its target, at the same depth; more than CRAWL_MAX_REDIRECTS in a row fail.
"""

from typing import Any
from uuid import UUID

import asyncpg

from consumer.delivery import Delivery
from consumer.fetcher import Fetcher, Page
from consumer.metrics import Metrics
from shared import db, messages, topology, urls
from shared.db import CrawlStatus, PageStatus
from shared.errors import InvalidMessage, PermanentError, TransientError, Unrecognised
from shared.messages import Frontier
from shared.settings import CrawlerSettings

LEASE_SECONDS = 120  # a claim older than this is taken over even without a redelivery

CLAIM = """
    UPDATE crawl_pages p
       SET status = 'fetching', attempts = p.attempts + 1, visit = nextval('crawl_visits'),
           claimed_until = clock_timestamp() + $3 * interval '1 second'
      FROM crawls c
     WHERE p.id = $1 AND c.id = p.crawl_id AND p.crawl_id = $4 AND p.url = $5
       AND (p.status = 'queued'
            OR (p.status = 'fetching' AND ($2 OR p.claimed_until < clock_timestamp())))
    RETURNING p.crawl_id, p.url, p.attempts, c.status AS crawl_status, c.allowed_hosts
"""

LOCK_CRAWL = "SELECT status, max_depth, max_pages, pages FROM crawls WHERE id = $1 FOR UPDATE"

STORE = """
    UPDATE crawl_pages
       SET status = $2, http_status = $3, content_type = $4, title = $5, links = $6,
           links_out = $7, error = $8, claimed_until = NULL, fetched_at = clock_timestamp()
     WHERE id = $1 AND status = 'fetching'
    RETURNING depth, redirects
"""

# New pages in the order their links appeared; pages already known at a greater depth are
# lowered (and returned, so a fetched one can pass the new depth on).
FOLLOW = """
    WITH wanted AS (
        SELECT url, min(ord) AS ord FROM unnest($2::text[]) WITH ORDINALITY AS t (url, ord)
        GROUP BY url
    ), lowered AS (
        UPDATE crawl_pages p SET depth = $3, redirects = $4
          FROM wanted w
         WHERE p.crawl_id = $1 AND p.url = w.url AND p.depth > $3
        RETURNING p.id, p.status, p.http_status, p.links_out
    ), fresh AS (
        INSERT INTO crawl_pages (crawl_id, url, depth, redirects, found_from)
        SELECT $1, w.url, $3, $4, $5 FROM wanted w
         WHERE NOT EXISTS (SELECT 1 FROM crawl_pages p WHERE p.crawl_id = $1 AND p.url = w.url)
         ORDER BY w.ord
         LIMIT $6
        RETURNING id
    )
    SELECT false AS new, id, status, http_status, links_out FROM lowered
    UNION ALL
    SELECT true, id, NULL, NULL, NULL FROM fresh
"""

CLOSE_IF_DONE = """
    UPDATE crawls SET status = 'completed', finished_at = clock_timestamp(),
                      updated_at = clock_timestamp()
     WHERE id = $1 AND status = 'running'
       AND NOT EXISTS (SELECT 1 FROM crawl_pages
                        WHERE crawl_id = $1 AND status IN ('queued', 'fetching'))
"""


class CrawlHandler:
    """The ``crawls`` lane: each crawl task waits in the window by its crawl's frontier order."""

    noun = "crawl task"
    subject = "page_id"

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: CrawlerSettings,
        metrics: Metrics,
        fetcher: Fetcher,
        lane: topology.Lane,
    ) -> None:
        self.pool, self.settings, self.metrics, self.fetcher = pool, settings, metrics, fetcher
        self.lane = lane  # the deployment's kind's ``crawls``
        self.concurrency, self.prefetch = settings.concurrency, settings.prefetch
        self.max_attempts, self.timeout = settings.max_attempts, settings.task_timeout
        self.retry_base_ms, self.retry_cap_ms = settings.retry_base_ms, settings.retry_cap_ms

    def place(self, message: Delivery) -> tuple[Frontier, int]:
        try:
            task = messages.decode_task(message)
        except InvalidMessage:
            return Frontier.FIFO, 0  # dead-lettered when its turn comes
        return task.frontier, task.depth

    async def process(self, message: Delivery, attempt: int) -> str:
        task = messages.decode_task(message)
        takeover = message.redelivered or attempt > 1
        claim = await self.pool.fetchrow(
            CLAIM, task.page_id, takeover, LEASE_SECONDS, task.crawl_id, task.url
        )
        if claim is None:
            stored = await self.pool.fetchrow(
                "SELECT status, crawl_id, url FROM crawl_pages WHERE id = $1", task.page_id
            )
            if stored is None:  # crawl tasks never create pages: only the API and the crawler do
                raise Unrecognised(f"no crawl page {task.page_id}")
            if (stored["crawl_id"], stored["url"]) != (task.crawl_id, task.url):
                raise Unrecognised(f"the task is not crawl page {task.page_id} as stored")
            status = stored["status"]
            if status == PageStatus.FETCHING:
                raise TransientError(f"{task.url} is being fetched by another consumer")
            return "duplicate"
        if claim["crawl_status"] != CrawlStatus.RUNNING:
            await self._close(task.crawl_id, task.page_id, PageStatus.CANCELLED, None)
            return "cancelled"
        if claim["attempts"] > 2 * self.max_attempts:
            raise PermanentError(f"started {claim['attempts'] - 1} times without settling")
        if urls.host_of(claim["url"]) not in claim["allowed_hosts"]:
            page = Page(PageStatus.FAILED, error="host not in the crawl's allowed_hosts")
        else:
            page = await self.fetcher.fetch(claim["url"])
        in_scope = [u for u in page.links if urls.host_of(u) in claim["allowed_hosts"]]
        return await self._settle(task.crawl_id, task.page_id, page, in_scope)

    async def _settle(self, crawl_id: UUID, page_id: UUID, page: Page, links: list[str]) -> str:
        async with self.pool.acquire() as conn, conn.transaction():
            crawl = await conn.fetchrow(LOCK_CRAWL, crawl_id)
            assert crawl is not None  # pages reference their crawl
            status, error = page.status, page.error
            if page.redirect and (
                await conn.fetchval("SELECT redirects FROM crawl_pages WHERE id = $1", page_id)
                >= self.settings.max_redirects
            ):
                status = PageStatus.FAILED
                error = f"more than {self.settings.max_redirects} redirects in a row"
                links = []
            stored = await conn.fetchrow(
                STORE,
                page_id,
                status,
                page.http_status,
                page.content_type and db.storable(page.content_type),
                page.title and db.storable(page.title),
                page.link_count,
                links,
                error and db.storable(error),
            )
            if stored is None:
                return "duplicate"  # another consumer took the page over and settled it
            if crawl["status"] == CrawlStatus.RUNNING and links:
                start = (page_id, stored["depth"], stored["redirects"], links, page.redirect)
                await _follow(conn, crawl_id, crawl, start)  # its pages wake the relay
            await conn.execute(CLOSE_IF_DONE, crawl_id)
        return str(status)

    async def _close(
        self, crawl_id: UUID, page_id: UUID, status: PageStatus, error: str | None
    ) -> None:
        """Settle a page that was not fetched, and the crawl if that was its last page."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_CRAWL, crawl_id)
            await conn.execute(
                """UPDATE crawl_pages SET status = $2, error = $3, claimed_until = NULL
                   WHERE id = $1 AND status IN ('queued', 'fetching')""",
                page_id,
                status,
                error and db.storable(error),
            )
            await conn.execute(CLOSE_IF_DONE, crawl_id)

    async def retrying(self, message: Delivery, error: str, delay_ms: int) -> None:
        if (page_id := messages.order_id_of(message)) is not None:
            await self.pool.execute(
                """UPDATE crawl_pages SET status = 'queued', error = $2, claimed_until = NULL
                   WHERE id = $1 AND status = 'fetching'""",
                page_id,
                db.storable(error),
            )

    async def failed(self, message: Delivery, error: str) -> None:
        if (page_id := messages.order_id_of(message)) is None:
            return
        crawl_id = await self.pool.fetchval(
            "SELECT crawl_id FROM crawl_pages WHERE id = $1", page_id
        )
        if crawl_id is not None:
            await self._close(crawl_id, page_id, PageStatus.FAILED, error)


async def _follow(
    conn: "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]",
    crawl_id: UUID,
    crawl: Any,
    start: tuple[UUID, int, int, list[str], bool],
) -> None:
    """Queue the pages ``start`` links to, lowering known ones."""
    remaining = crawl["max_pages"] - crawl["pages"]
    found = 0
    work = [start]
    while work:
        page_id, depth, redirects, links, redirect = work.pop()
        depth, redirects = (depth, redirects + 1) if redirect else (depth + 1, 0)
        if depth > crawl["max_depth"] or not links:
            continue
        rows = await conn.fetch(
            FOLLOW, crawl_id, links, depth, redirects, page_id, max(remaining, 0)
        )
        for row in rows:
            if row["new"]:
                found += 1
                remaining -= 1
            elif row["status"] == PageStatus.FETCHED and row["links_out"]:
                again = 300 <= (row["http_status"] or 0) < 400
                work.append((row["id"], depth, redirects, row["links_out"], again))
    if found:
        await conn.execute(
            "UPDATE crawls SET pages = pages + $2, updated_at = clock_timestamp() WHERE id = $1",
            crawl_id,
            found,
        )
