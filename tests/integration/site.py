"""A generated web site on 127.0.0.1 with a known link graph, for the crawler's tests.

It records every request (path, start and end time) so tests can check what was fetched,
how often, in which order, and how politely.
"""

import asyncio
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from urllib.parse import urljoin

from aiohttp import web

ROBOTS = "User-agent: *\nDisallow: /private/\n"


@dataclass
class Site:
    """``links``: HTML pages and where they link; ``redirects``: path → target; anything else
    linked is a leaf (an error, a huge page, a file, a disallowed page)."""

    links: dict[str, list[str]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # leaves answered with an error
    html: dict[str, bytes] = field(default_factory=dict)  # pages answered exactly so
    delay: float = 0.0  # seconds each page takes to answer
    robots: str = ROBOTS
    hits: Counter[str] = field(default_factory=Counter)
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, path
    active: int = 0
    most_active: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reachable(self, max_depth: int, max_redirects: int = 5) -> dict[str, int]:
        """Every path a crawl from ``/`` finds within ``max_depth``, with its depth.

        A link costs one level, a redirect none; the page after ``max_redirects`` redirects in a
        row is found (and fails) but not followed.
        """
        found: dict[str, tuple[int, int]] = {"/": (0, 0)}
        queue = deque(["/"])
        while queue:  # 0-1 breadth-first search
            path = queue.popleft()
            depth, hops = found[path]
            if path in self.redirects:
                if hops >= max_redirects:
                    continue
                edges = [(self.redirects[path], depth, hops + 1)]
            else:
                edges = [(urljoin(path, t), depth + 1, 0) for t in self.links.get(path, [])]
            for target, d, h in edges:
                if d <= max_depth and (target not in found or found[target][0] > d):
                    found[target] = (d, h)
                    (queue.appendleft if d == depth else queue.append)(target)
        return {path: depth for path, (depth, _) in found.items()}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        start = time.monotonic()
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if path != "/robots.txt":
                self.hits[path] += 1
            await asyncio.sleep(self.delay)
            return self._answer(path)
        finally:
            self.active -= 1
            self.spans.append((start, time.monotonic(), path))

    def _answer(self, path: str) -> web.StreamResponse:
        if path == "/robots.txt":
            return web.Response(text=self.robots, content_type="text/plain")
        if path in self.redirects:
            raise web.HTTPFound(self.redirects[path])
        if path in self.html:
            return web.Response(body=self.html[path], content_type="text/html")
        if path in self.statuses:
            return web.Response(status=self.statuses[path], text="no")
        if path == "/huge":
            return web.Response(text="<html>" + "x" * 3_000_000, content_type="text/html")
        if path == "/file.bin":
            return web.Response(body=b"\x00" * 1000, content_type="application/octet-stream")
        if path in self.links:
            anchors = "".join(f'<a href="{t}">{t}</a>' for t in self.links[path])
            extra = '<a href="#top">self</a><a href="mailto:x@example.com">mail</a>'
            extra += '<a href="http://example.invalid/elsewhere">elsewhere</a>'
            return web.Response(
                text=f"<html><head><title>page {path}</title></head>"
                f"<body>{anchors}{extra}</body></html>",
                content_type="text/html",
            )
        if path.startswith("/private/"):
            return web.Response(text="<title>secret</title>", content_type="text/html")
        return web.Response(status=404, text="not found")

    async def start(self) -> "Site":
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def generated(pages: int = 300, out: int = 4, seed: int = 7) -> Site:
    """``pages`` HTML pages linking at random (relative and absolute links), plus one of each
    awkward case: broken links, a redirect loop, a chain of redirects, a huge page, a file,
    a robots.txt disallow, and a server that always fails."""
    rng = random.Random(seed)
    site = Site()
    names = ["/"] + [f"/p/{i}" for i in range(1, pages)]
    for name in names:
        site.links[name] = rng.sample(names, out)
    site.links["/"] += [
        "/p/1",
        "/missing/1",
        "/loop/a",
        "/chain/0",
        "/huge",
        "/file.bin",
        "/private/secret",
        "/flaky",
        "/p/1?x=1",
        "p/2",
    ]
    site.links["/p/1"] += ["/missing/2", "/gone"]
    site.links["/p/1?x=1"] = []
    site.links["/p/2"] = site.links.get("/p/2", [])
    site.redirects.update({"/loop/a": "/loop/b", "/loop/b": "/loop/a"})
    site.redirects.update({f"/chain/{i}": f"/chain/{i + 1}" for i in range(10)})
    site.statuses.update({"/missing/1": 404, "/missing/2": 404, "/gone": 410, "/flaky": 503})
    for path in ("/huge", "/file.bin", "/private/secret", "/flaky", *site.statuses):
        site.links.pop(path, None)
    return site


def tree(fanout: int, depth: int) -> Site:
    """A tree: every page at depth < ``depth`` links to ``fanout`` children."""
    site = Site(robots="")
    level = ["/"]
    for d in range(depth):
        next_level = []
        for parent in level:
            children = [f"/t{d + 1}/{len(next_level) + i}" for i in range(fanout)]
            site.links[parent] = children
            next_level += children
        level = next_level
    for leaf in level:
        site.links[leaf] = []
    return site
