"""Order events as server-sent events (docs/notifications.md): ``GET /orders/{id}/events``, one
order's history then its changes until a final status, and ``GET /events``, the changes of every
order an API key submitted. The triggers of ``schema/0009_order_events.sql`` write the events;
one ``Hub`` per process listens for their NOTIFY, reads what is new once, and hands it to the
streams that want it, so no stream polls the database.

Events are read in (tx, id) order, and only those of transactions that have ended: an event is
never read after one that sorts later, so resuming after the last event read (``Last-Event-ID``)
leaves no gap and repeats nothing.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import orjson
from fastapi import APIRouter, Depends, Header, Request, Security
from fastapi.security import APIKeyQuery
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from producer.auth import Guard
from producer.problems import Problem
from producer.services import Caller, Services
from shared import db, logs
from shared.db import FINAL

log = logging.getLogger(__name__)

COLUMNS = (
    "id, tx::text::bigint AS tx, order_id, type, status, attempts, reason, next_attempt_at, at"
)
# Only events of transactions that have ended, in the order no later read can contradict.
SETTLED = "tx < pg_snapshot_xmin(pg_current_snapshot())"
AFTER = "(tx, id) > ($1::bigint::text::xid8, $2::bigint)"
# The oldest transaction still running: every event below it is settled (``BEFORE`` it).
HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
BEFORE = "tx < $3::bigint::text::xid8"
READ_BATCH = 1_000
QUEUED = 1_000  # events waiting for one slow stream; past that it ends, and the client resumes
TOKEN_SECONDS = 600
# After a notification the hub waits this long before reading: the notifications of that time
# share one read (at most 50 reads a second, however many transactions write events).
GATHER_SECONDS = 0.02

Position = tuple[int, int]  # (tx, id)


def _sse(row: asyncpg.Record) -> ServerSentEvent:
    """An event as a stream sends it: its type as the SSE event name, its id as the SSE id, and
    as data the JSON object docs/notifications.md describes."""
    data = {
        "id": row["id"],
        "order_id": str(row["order_id"]),
        "type": row["type"],
        "status": row["status"],
        "attempts": row["attempts"],
        "reason": row["reason"],
        "next_attempt_at": row["next_attempt_at"],
        "at": row["at"],
    }
    return ServerSentEvent(
        raw_data=orjson.dumps(data, option=orjson.OPT_UTC_Z).decode(),
        event=row["type"],
        id=str(row["id"]),
    )


@dataclass(eq=False)
class Stream:
    """What one open stream wants (an order, or a key's orders) and what has come for it."""

    order_id: UUID | None
    owner: str | None
    queue: "asyncio.Queue[asyncpg.Record]" = field(default_factory=lambda: asyncio.Queue(QUEUED))
    overflowed: bool = False

    def deliver(self, row: asyncpg.Record) -> None:
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            self.overflowed = True


class Hub:
    """The process's one LISTEN connection for order events and the streams it feeds; it reads
    only while a stream is open."""

    def __init__(self, pool: asyncpg.Pool, url: str, per_key: int, most: int) -> None:
        self.pool, self.url, self.per_key, self.most = pool, url, per_key, most
        self.by_order: dict[UUID, set[Stream]] = defaultdict(set)
        self.by_owner: dict[str, set[Stream]] = defaultdict(set)
        self.watchers: set[asyncio.Event] = set()  # set when any event was read (the dashboard)
        self.open: dict[str, int] = defaultdict(int)  # streams per key name
        self.position: Position | None = None  # None: no stream, nothing read
        self.woken = asyncio.Event()
        self._reading = asyncio.Lock()

    @property
    def count(self) -> int:
        return sum(self.open.values())

    @contextlib.asynccontextmanager
    async def slot(self, caller: str) -> AsyncIterator[None]:
        """Room for one more stream of ``caller``'s, or a 429 (the key's share) or 503 (the
        process's) problem."""
        if self.open[caller] >= self.per_key:
            raise Problem(
                429,
                "Too many streams",
                f"This API key has {self.per_key} event streams open, its most.",
                "/problems/rate-limited",
                headers={"Retry-After": "5"},
            )
        if self.count >= self.most:
            raise Problem(
                503,
                "Too many streams",
                f"This server has {self.most} event streams open, its most; try another.",
                "/problems/unavailable",
                headers={"Retry-After": "5"},
            )
        self.open[caller] += 1
        try:
            yield
        finally:
            self.open[caller] -= 1

    @contextlib.asynccontextmanager
    async def subscribed(self, stream: Stream) -> AsyncIterator[Stream]:
        """``stream`` fed with every event read from now on. Entered before its history is read:
        what the history misses (transactions still running) comes here."""
        await self._start_reading()
        index: dict[Any, set[Stream]] = self.by_order if stream.order_id else self.by_owner
        wanted = stream.order_id or stream.owner
        index[wanted].add(stream)
        try:
            yield stream
        finally:
            index[wanted].discard(stream)
            if not index[wanted]:
                del index[wanted]
            self._stop_reading()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[asyncio.Event]:
        """An event set whenever order events were read (clear it to wait for the next)."""
        await self._start_reading()
        changed = asyncio.Event()
        self.watchers.add(changed)
        try:
            yield changed
        finally:
            self.watchers.discard(changed)
            self._stop_reading()

    async def _start_reading(self) -> None:
        """Read from here on, if nothing was being read: from the oldest transaction running,
        so that every event not yet settled is read when it is."""
        if self.position is None:
            tx = await self.pool.fetchval(HORIZON)
            self.position = self.position or (tx, 0)

    def _stop_reading(self) -> None:
        if not self.by_order and not self.by_owner and not self.watchers:
            self.position = None

    async def read(self) -> None:
        """Hand the events settled since the last read to the streams that want them. Only
        theirs are read; the position then moves to the horizon the read was made under."""
        async with self._reading:
            while self.position is not None:
                horizon = await self.pool.fetchval(HORIZON)
                if self.watchers and await self.pool.fetchval(
                    f"SELECT EXISTS (SELECT FROM order_events WHERE {AFTER} AND {BEFORE})",
                    *self.position,
                    horizon,
                ):
                    for changed in self.watchers:
                        changed.set()
                rows = await self.pool.fetch(
                    f"SELECT {COLUMNS}, api_key FROM order_events WHERE {AFTER} AND {BEFORE}"
                    " AND (order_id = ANY($4::uuid[]) OR api_key = ANY($5::text[]))"
                    f" ORDER BY tx, id LIMIT {READ_BATCH}",
                    *self.position,
                    horizon,
                    list(self.by_order),
                    list(self.by_owner),
                )
                for row in rows:
                    for stream in self.by_order.get(row["order_id"], ()):
                        stream.deliver(row)
                    for stream in self.by_owner.get(row["api_key"], ()):
                        stream.deliver(row)
                if self.position is None:
                    return
                if len(rows) == READ_BATCH:  # more before the horizon: on from the last one
                    self.position = (rows[-1]["tx"], rows[-1]["id"])
                    continue
                # Every event before the horizon was considered. A stream subscribed since
                # reads its history after subscribing, so under a later horizon: none is lost.
                self.position = (horizon, 0)
                return

    async def run(self, stopping: asyncio.Event) -> None:
        """Listen, and read after each notification (those of ``GATHER_SECONDS`` together), and
        every second (for events whose transaction ended after an older one's notification),
        until ``stopping``."""
        while not stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self.url)
                await conn.add_listener(db.EVENTS_CHANNEL, lambda *_: self.woken.set())
                while not conn.is_closed() and not stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.woken.wait(), 1)
                        await asyncio.sleep(GATHER_SECONDS)
                    self.woken.clear()
                    if self.position is not None:
                        await self.read()
                    await conn.execute("SELECT 1", timeout=5)  # a primary cut off, noticed
            except Exception as exc:
                log.warning("event listener: %r", exc, extra=logs.event("events_unavailable"))
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1)


@contextlib.asynccontextmanager
async def running(pool: asyncpg.Pool, url: str, per_key: int, most: int) -> AsyncIterator[Hub]:
    """A hub at work while the block runs."""
    hub, stopping = Hub(pool, url, per_key, most), asyncio.Event()
    task = asyncio.create_task(hub.run(stopping), name="event-hub")
    try:
        yield hub
    finally:
        stopping.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Streams are opened by browsers too, whose EventSource sends no headers: a short-lived token
# from ``POST /events/tokens`` in ``access_token`` stands for the key (for streams only).
def make_token(guard: Guard, name: str, now: float | None = None) -> tuple[str, int]:
    expires = int((now or time.time()) + TOKEN_SECONDS)
    return f"{name}.{expires}.{_signature(guard, name, expires)}", expires


def _signature(guard: Guard, name: str, expires: int) -> str:
    mac = hmac.new(guard.keys[name], f"events:{name}:{expires}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def token_owner(guard: Guard, token: str) -> str | None:
    """The key name a valid, unexpired token was made for."""
    owner, expires, signature = [*token.rsplit(".", 2), "", ""][:3]
    if owner not in guard.keys or not expires.isdigit() or int(expires) < time.time():
        return None
    expected = _signature(guard, owner, int(expires))
    return owner if hmac.compare_digest(expected, signature) else None


# Declares the token in the OpenAPI document; ``_reader`` reads it itself.
TOKEN = Security(APIKeyQuery(name="access_token", auto_error=False))


async def _reader(request: Request) -> str:
    """The caller of a stream: an API key in the headers, or a token in ``access_token``."""
    services = Services.of(request.app)
    access_token = request.query_params.get("access_token")
    if access_token is not None:
        owner = token_owner(services.guard, access_token)
        if owner is None:
            raise Problem(
                401,
                "Unauthorized",
                "The access_token is not valid or has expired; make another.",
                "/problems/unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="orders"'},
            )
        return owner
    headers = request.headers
    return services.guard.admit(headers.get("X-API-Key"), headers.get("Authorization"))


Reader = Annotated[str, Depends(_reader)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]

router = APIRouter()
keyed = APIRouter()  # under the app's key check


class Token(BaseModel):
    token: str = Field(description="pass as ?access_token= to a stream; read-only, for streams")
    expires_at: int = Field(description="Unix time after which it is refused")


@keyed.post("/events/tokens", status_code=201, response_model=Token)
async def make_events_token(request: Request, caller: Caller) -> Token:
    """A token that opens event streams as the calling key for ten minutes (for EventSource)."""
    token, expires = make_token(Services.of(request.app).guard, caller)
    return Token(token=token, expires_at=expires)


async def _resumed(pool: asyncpg.Pool, last_event_id: str | None) -> asyncpg.Record | None:
    """The event a client read last, if it names one still kept."""
    if last_event_id is None or not last_event_id.isdigit() or len(last_event_id) > 18:
        return None
    return await pool.fetchrow(
        f"SELECT {COLUMNS} FROM order_events WHERE id = $1", int(last_event_id)
    )


# A stream's checks are dependencies: what a path operation that yields raises comes after
# its 200. Each holds the caller's room while the stream runs.
async def _open_order(order_id: UUID, request: Request, caller: Reader) -> AsyncIterator[str]:
    """The order's status now, once it is known to exist and the caller has room."""
    services = Services.of(request.app)
    status = await services.pool.fetchval("SELECT status FROM orders WHERE id = $1", order_id)
    if status is None:
        raise Problem(
            404, "Order not found", f"No order has the id {order_id}.", "/problems/not-found"
        )
    async with services.hub.slot(caller):
        yield status


async def _open_key(request: Request, caller: Reader) -> AsyncIterator[str]:
    """The caller, once it has room."""
    async with Services.of(request.app).hub.slot(caller):
        yield caller


@router.get(
    "/orders/{order_id:uuid}/events",
    response_class=EventSourceResponse,
    responses={404: {}, 429: {}, 503: {}},
)
async def order_events(
    order_id: UUID,
    request: Request,
    status: Annotated[str, Depends(_open_order)],
    last_event_id: LastEventId = None,
) -> AsyncIterator[ServerSentEvent]:
    """The order's events: its history, then each change as it commits; the stream ends after
    a final status (completed, rejected, failed). ``Last-Event-ID`` resumes after that event."""
    services = Services.of(request.app)
    hub, pool = services.hub, services.pool
    resumed = await _resumed(pool, last_event_id)
    position: Position = (resumed["tx"], resumed["id"]) if resumed else (0, 0)
    async with hub.subscribed(Stream(order_id, None)) as stream:
        history = await pool.fetch(
            f"SELECT {COLUMNS} FROM order_events WHERE order_id = $3 AND {AFTER} AND {SETTLED}"
            " ORDER BY tx, id",
            *position,
            order_id,
        )
        last = resumed
        for row in history:
            yield _sse(row)
            last, position = row, (row["tx"], row["id"])
        if (last is None or last["type"] in FINAL) and status in FINAL:
            return  # nothing more will come (an order older than its events ends at once)
        async for row in _live(stream, position):
            yield _sse(row)
            if row["type"] in FINAL:
                return


@router.get(
    "/events",
    response_class=EventSourceResponse,
    responses={429: {}, 503: {}},
)
async def key_events(
    request: Request,
    caller: Annotated[str, Depends(_open_key)],
    last_event_id: LastEventId = None,
) -> AsyncIterator[ServerSentEvent]:
    """The events of every order submitted with the calling key, as they commit; with
    ``Last-Event-ID``, those after that event first. It does not end."""
    services = Services.of(request.app)
    hub, pool = services.hub, services.pool
    resumed = await _resumed(pool, last_event_id)
    async with hub.subscribed(Stream(None, caller)) as stream:
        # Not resumed: from now, the horizon after subscribing (what settles later is read for
        # this stream by the hub; what settled before is not this stream's).
        position: Position = (
            (resumed["tx"], resumed["id"]) if resumed else (await pool.fetchval(HORIZON), 0)
        )
        if resumed:
            while True:  # the history, a batch at a time
                rows = await pool.fetch(
                    f"SELECT {COLUMNS} FROM order_events WHERE api_key = $3 AND {AFTER}"
                    f" AND {SETTLED} ORDER BY tx, id LIMIT {READ_BATCH}",
                    *position,
                    caller,
                )
                for row in rows:
                    yield _sse(row)
                    position = (row["tx"], row["id"])
                if len(rows) < READ_BATCH:
                    break
        async for row in _live(stream, position):
            yield _sse(row)


async def _live(stream: Stream, after: Position) -> AsyncIterator[asyncpg.Record]:
    """What the hub hands ``stream``, past ``after`` (the history may have had it already)."""
    while True:
        if stream.overflowed:
            log.info("a stream fell behind; it ends", extra=logs.event("stream_overflowed"))
            return
        row = await stream.queue.get()
        if (row["tx"], row["id"]) > after:
            after = (row["tx"], row["id"])
            yield row
