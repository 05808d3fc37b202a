"""HTTP for the crawler: one guarded aiohttp session, robots.txt, and politeness per host.

- Every connection goes through a resolver that refuses non-public addresses (shared/urls.py);
  IP literals, which aiohttp does not resolve, are checked before the request.
- Redirects are not followed here: a redirect is a page whose one link is its ``Location``, so
  the target is checked, deduplicated and fetched like any other page (docs/crawler.md).
- At most CRAWL_HOST_CONCURRENCY requests at once per host, and CRAWL_HOST_DELAY_MS (or the
  host's robots.txt Crawl-delay, if longer) between the starts of two requests, per process.
- Bodies are read up to CRAWL_MAX_BYTES; only HTML is parsed.
"""

import asyncio
import socket
import time
import urllib.robotparser
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from selectolax.lexbor import LexborHTMLParser

from shared import urls
from shared.db import PageStatus
from shared.errors import TransientError
from shared.settings import CrawlerSettings

HTML_TYPES = ("text/html", "application/xhtml+xml")
RETRY_STATUSES = (408, 425, 429)  # and every 5xx
ROBOTS_TTL = 600.0  # seconds a robots.txt is trusted


class FetchFailed(TransientError):
    """The host could not be reached or answered with a server error: try again later."""


@dataclass
class Page:
    """What fetching one URL found."""

    status: PageStatus
    http_status: int | None = None
    content_type: str | None = None
    title: str | None = None
    links: list[str] = field(default_factory=list)  # absolute, normalised, first occurrence
    link_count: int | None = None  # every <a href> on an HTML page, followable or not
    error: str | None = None
    redirect: bool = False


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then refuses the host if any address is not public (``urls``; the
    webhooks' sender uses it too, with its own ``setting``)."""

    def __init__(self, allowed_private: frozenset[str], setting: str = urls.CRAWLS) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allowed, self._setting = allowed_private, setting

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        urls.check_addresses(host, [r["host"] for r in results], self._allowed, self._setting)
        return results

    async def close(self) -> None:
        await self._inner.close()


class GuardedClient:
    """Holds one aiohttp session while entered, whose every connection passes the address
    policy; no cookies. The fetcher's and the webhook sender's base."""

    _session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        raise NotImplementedError

    @staticmethod
    def _guarded(
        allowed_private: frozenset[str], setting: str, seconds: float, **kwargs: Any
    ) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(allowed_private, setting)),
            timeout=aiohttp.ClientTimeout(total=seconds),
            cookie_jar=aiohttp.DummyCookieJar(),
            **kwargs,
        )

    async def __aenter__(self) -> Self:
        self._session = self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class _Host:
    slots: asyncio.Semaphore
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_start: float = 0.0


class Fetcher(GuardedClient):
    def __init__(self, settings: CrawlerSettings) -> None:
        self.settings = settings
        self.allowed_private = urls.parse_hosts(settings.allowed_private_hosts)
        self._hosts: dict[str, _Host] = {}
        self._robots: dict[str, tuple[float, urllib.robotparser.RobotFileParser | None]] = {}
        self._robots_locks: dict[str, asyncio.Lock] = {}

    def _open(self) -> aiohttp.ClientSession:
        s = self.settings
        headers = {"User-Agent": s.user_agent, "Accept": "text/html,*/*;q=0.5"}
        return self._guarded(self.allowed_private, urls.CRAWLS, s.fetch_timeout, headers=headers)

    async def fetch(self, url: str) -> Page:
        """Fetch ``url`` if robots.txt allows; raises ``FetchFailed`` when worth retrying."""
        try:
            robots = await self._robots_for(url)
            if robots is not None and not robots.can_fetch(self.settings.user_agent, url):
                return Page(PageStatus.BLOCKED, error="disallowed by robots.txt")
            delay = robots.crawl_delay(self.settings.user_agent) if robots else None
            async with self._get(url, float(delay or 0)) as response:
                return await self._read(url, response)
        except urls.AddressRefused as exc:
            return Page(PageStatus.FAILED, error=str(exc))
        except aiohttp.InvalidURL as exc:
            return Page(PageStatus.FAILED, error=f"invalid URL: {exc}")

    @asynccontextmanager
    async def _get(self, url: str, crawl_delay: float) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET with the address policy and politeness applied."""
        host = urls.host_of(url)
        if (literal := urls.ip_literal(host)) is not None:  # aiohttp does not resolve these
            urls.check_addresses(host, [literal], self.allowed_private)
        assert self._session is not None
        async with self._polite(urlsplit(url).netloc, crawl_delay):
            try:
                async with self._session.get(url, allow_redirects=False) as response:
                    yield response
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.__cause__, urls.AddressRefused):
                    raise exc.__cause__ from None
                raise FetchFailed(f"cannot connect to {host}: {exc.os_error}") from None
            except aiohttp.InvalidURL:
                raise  # no retry can mend it: fetch() fails the page
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise FetchFailed(f"fetching {url} failed: {_name(exc)}") from None

    @asynccontextmanager
    async def _polite(self, host: str, crawl_delay: float) -> AsyncIterator[None]:
        s = self.settings
        state = self._hosts.setdefault(host, _Host(asyncio.Semaphore(s.host_concurrency)))
        async with state.slots:
            async with state.lock:
                wait = state.next_start - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                state.next_start = time.monotonic() + max(s.host_delay_ms / 1000, crawl_delay)
            yield

    async def _read(self, url: str, response: aiohttp.ClientResponse) -> Page:
        status, kind = response.status, response.content_type
        if 300 <= status < 400:
            target = urls.normalise(response.headers.get("Location", ""), url)
            if target is None:
                return Page(
                    PageStatus.FAILED, status, kind, error="redirect without a usable Location"
                )
            return Page(
                PageStatus.FETCHED, status, kind, links=[target], link_count=1, redirect=True
            )
        if status >= 500 or status in RETRY_STATUSES:
            raise FetchFailed(f"HTTP {status} {response.reason or ''}".strip())
        if status >= 400:
            return Page(
                PageStatus.FAILED,
                status,
                kind,
                error=f"HTTP {status} {response.reason or ''}".strip(),
            )
        limit = self.settings.max_bytes
        if (response.content_length or 0) > limit:
            return Page(PageStatus.FAILED, status, kind, error=f"larger than {limit} bytes")
        body = bytearray()
        try:
            async for chunk in response.content.iter_chunked(65_536):
                body += chunk
                if len(body) > limit:
                    return Page(PageStatus.FAILED, status, kind, error=f"larger than {limit} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchFailed(f"reading {url} failed: {_name(exc)}") from None
        if kind not in HTML_TYPES:
            return Page(PageStatus.FETCHED, status, kind)
        title, links, count = parse(bytes(body), response.charset or "utf-8", url)
        return Page(PageStatus.FETCHED, status, kind, title, links, count)

    async def _robots_for(self, url: str) -> urllib.robotparser.RobotFileParser | None:
        """The host's robots.txt, cached; ``None`` when it has none (everything allowed)."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        lock = self._robots_locks.setdefault(origin, asyncio.Lock())
        async with lock:
            cached = self._robots.get(origin)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            parser: urllib.robotparser.RobotFileParser | None = None
            async with self._get(f"{origin}/robots.txt", 0.0) as response:
                if response.status >= 500 or response.status in RETRY_STATUSES:
                    raise FetchFailed(f"robots.txt: HTTP {response.status}")
                if response.status == 200:
                    text = (await response.content.read(512_000)).decode("utf-8", "replace")
                    parser = urllib.robotparser.RobotFileParser()
                    parser.parse(text.splitlines())
            self._robots[origin] = (time.monotonic() + ROBOTS_TTL, parser)
            return parser


def parse(body: bytes, charset: str, url: str) -> tuple[str | None, list[str], int]:
    """The title, the followable links (absolute, normalised, deduplicated) and the raw count."""
    try:
        text = body.decode(charset, "replace")
    except LookupError:
        text = body.decode("utf-8", "replace")
    tree = LexborHTMLParser(text)
    title_node = tree.css_first("title")
    title = title_node.text(strip=True)[:500] or None if title_node is not None else None
    base_node = tree.css_first("base[href]")
    base = urls.normalise(base_node.attributes.get("href") or "", url) if base_node else None
    hrefs = [a.attributes.get("href") or "" for a in tree.css("a[href]")]
    found = (urls.normalise(h, base or url) for h in hrefs)
    return title, list(dict.fromkeys(u for u in found if u is not None)), len(hrefs)


def _name(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
