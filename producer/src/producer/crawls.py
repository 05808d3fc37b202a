"""The crawl routes: start a crawl, follow its progress, list its pages, cancel it."""

import hashlib
from datetime import datetime
from typing import Annotated
from uuid import UUID

import asyncpg
import orjson
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from producer.api import IdempotencyKey, key_reused, link
from producer.problems import Problem
from producer.services import PoolDep, ServicesDep
from shared import urls
from shared.db import CrawlStatus, PageStatus, replicated
from shared.messages import Frontier, new_id

router = APIRouter(tags=["crawls"])

Host = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\[\]-]+$")
]


class NewCrawl(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    url: Annotated[
        str,
        StringConstraints(min_length=1, max_length=urls.MAX_URL_LENGTH),
        Field(description="an absolute http or https URL", json_schema_extra={"format": "uri"}),
    ]
    max_depth: Annotated[int, Field(ge=0, le=50)] = 2
    max_pages: Annotated[int, Field(ge=1, le=100_000)] = 200
    order: Annotated[Frontier, Field(strict=False)] = Frontier.FIFO
    allowed_hosts: Annotated[
        list[Host] | None,
        Field(max_length=100, description="hosts the crawl may visit; default: the URL's host"),
    ] = None


class CrawlView(BaseModel):
    id: UUID
    url: str
    order: Frontier
    max_depth: int
    max_pages: int
    allowed_hosts: list[str]
    status: CrawlStatus
    pages_found: int = Field(description="distinct URLs found, at most max_pages")
    queued: int = Field(description="found, waiting to be fetched or being fetched")
    fetched: int
    failed: int
    blocked: int = Field(description="disallowed by robots.txt, never fetched")
    cancelled: int = Field(description="still queued when the crawl was cancelled")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class PageView(BaseModel):
    url: str
    depth: int
    status: PageStatus
    http_status: int | None
    content_type: str | None
    title: str | None
    links: int | None = Field(description="outgoing links on the page, in scope or not")
    error: str | None
    attempts: int
    visit: int | None = Field(description="increases in the order fetches started")
    fetched_at: datetime | None


VIEW = """
    SELECT c.id, c.root_url AS url, c.frontier AS order, c.max_depth, c.max_pages,
           c.allowed_hosts, c.status, c.pages AS pages_found, c.created_at, c.updated_at,
           c.finished_at, c.request_hash,
           count(*) FILTER (WHERE p.status IN ('queued', 'fetching')) AS queued,
           count(*) FILTER (WHERE p.status = 'fetched') AS fetched,
           count(*) FILTER (WHERE p.status = 'failed') AS failed,
           count(*) FILTER (WHERE p.status = 'blocked') AS blocked,
           count(*) FILTER (WHERE p.status = 'cancelled') AS cancelled
    FROM crawls c LEFT JOIN crawl_pages p ON p.crawl_id = c.id
    WHERE {where}
    GROUP BY c.id
"""

# The crawl and its root page (the root's task is published by the relay) in one statement.
START = """
    WITH crawl AS (
        INSERT INTO crawls (id, root_url, frontier, max_depth, max_pages, allowed_hosts, status,
                            pages, idempotency_key, request_hash)
        VALUES ($1, $2, $3, $4, $5, $6, 'running', 1, $7, $8)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id
    )
    INSERT INTO crawl_pages (crawl_id, url, depth) SELECT id, $2, 0 FROM crawl
    RETURNING crawl_id
"""


def _not_found(crawl_id: UUID) -> Problem:
    return Problem(
        404, "Crawl not found", f"No crawl has the id {crawl_id}.", "/problems/not-found"
    )


async def _view(pool: asyncpg.Pool, crawl_id: UUID) -> tuple[CrawlView, bytes | None]:
    row = await pool.fetchrow(VIEW.format(where="c.id = $1"), crawl_id)
    if row is None:
        raise _not_found(crawl_id)
    values = dict(row)
    digest = values.pop("request_hash")
    return CrawlView.model_validate(values), digest


@router.post(
    "/crawls",
    status_code=202,
    response_model=CrawlView,
    responses={
        202: {
            "headers": {
                "Location": {"description": "the crawl's URL", "schema": {"type": "string"}}
            },
            "links": {
                name: link(operation, crawl_id="$response.body#/id")
                for name, operation in (
                    ("crawl", "get_crawl"),
                    ("pages", "list_pages"),
                    ("cancel", "cancel_crawl"),
                )
            },
        },
        422: {"description": "invalid crawl, a private address, or an Idempotency-Key reused"},
        503: {"description": "the store is unavailable, or did not confirm the write"},
    },
)
async def start_crawl(
    crawl: NewCrawl,
    response: Response,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> CrawlView:
    """Start a crawl at ``url``: stored before the 202, then crawled by the consumers."""
    pool = services.pool
    allowed_private = urls.parse_hosts(services.settings.crawl_allowed_private_hosts)
    root = await urls.checked(crawl.url, allowed_private)
    hosts = sorted({h.lower().strip("[]") for h in crawl.allowed_hosts or [urls.host_of(root)]})
    digest = hashlib.sha256(
        orjson.dumps([root, crawl.max_depth, crawl.max_pages, crawl.order.value, hosts])
    ).digest()
    async with pool.acquire() as conn, replicated(conn):
        crawl_id = await conn.fetchval(
            START,
            new_id(),
            root,
            crawl.order.value,
            crawl.max_depth,
            crawl.max_pages,
            hosts,
            idempotency_key,
            digest if idempotency_key else None,
        )
    if crawl_id is None:  # the key was used before; found once the standby has it (store.py)
        async with pool.acquire() as conn, replicated(conn), conn.transaction():
            await conn.execute("SELECT hold_crawls($1)", [idempotency_key])
            crawl_id = await conn.fetchval(
                "SELECT id FROM crawls WHERE idempotency_key = $1", idempotency_key
            )
    view, earlier = await _view(pool, crawl_id)
    if idempotency_key and earlier != digest:
        raise key_reused()
    response.headers["Location"] = f"/crawls/{crawl_id}"
    return view


@router.get("/crawls/{crawl_id}", response_model=CrawlView, responses={404: {}})
async def get_crawl(crawl_id: UUID, pool: PoolDep) -> CrawlView:
    """A crawl's status and progress."""
    view, _ = await _view(pool, crawl_id)
    return view


@router.get("/crawls/{crawl_id}/pages", response_model=list[PageView], responses={404: {}})
async def list_pages(
    crawl_id: UUID,
    pool: PoolDep,
    status: PageStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[PageView]:
    """The pages found so far, in the order they were found."""
    if await pool.fetchval("SELECT 1 FROM crawls WHERE id = $1", crawl_id) is None:
        raise _not_found(crawl_id)
    rows = await pool.fetch(
        """SELECT url, depth, status, http_status, content_type, title, links, error, attempts,
                  visit, fetched_at
           FROM crawl_pages WHERE crawl_id = $1 AND ($2::text IS NULL OR status = $2)
           ORDER BY seq LIMIT $3 OFFSET $4""",
        crawl_id,
        status,
        limit,
        offset,
    )
    return [PageView.model_validate(dict(r)) for r in rows]


@router.delete(
    "/crawls/{crawl_id}",
    response_model=CrawlView,
    responses={404: {}, 409: {"description": "the crawl has already completed"}},
)
async def cancel_crawl(crawl_id: UUID, pool: PoolDep) -> CrawlView:
    """Cancel a running crawl: queued pages are dropped, pages being fetched finish."""
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.fetchval("SELECT status FROM crawls WHERE id = $1 FOR UPDATE", crawl_id)
        if status is None:
            raise _not_found(crawl_id)
        if status == CrawlStatus.COMPLETED:
            raise Problem(
                409,
                "Crawl already completed",
                f"Crawl {crawl_id} has completed; there is nothing to cancel.",
                "/problems/conflict",
            )
        if status == CrawlStatus.RUNNING:
            await conn.execute(
                """UPDATE crawls SET status = 'cancelled', finished_at = clock_timestamp(),
                                     updated_at = clock_timestamp() WHERE id = $1""",
                crawl_id,
            )
            await conn.execute(
                """UPDATE crawl_pages SET status = 'cancelled', unpublished = false
                   WHERE crawl_id = $1 AND status = 'queued'""",
                crawl_id,
            )
    view, _ = await _view(pool, crawl_id)
    return view
