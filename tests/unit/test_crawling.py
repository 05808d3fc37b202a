"""URL normalisation, the address policy, HTML parsing and the local window, without I/O."""

import asyncio
from unittest.mock import sentinel

import pytest

from consumer.fetcher import parse
from consumer.window import Window
from shared import db, urls
from shared.messages import Frontier
from shared.settings import ConsumerSettings


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        ("HTTP://Example.COM", None, "http://example.com/"),
        ("http://example.com:80/a#frag", None, "http://example.com/a"),
        ("https://example.com:443/a?q=1", None, "https://example.com/a?q=1"),
        ("https://example.com:8443/", None, "https://example.com:8443/"),
        ("../b", "http://example.com/x/y/z", "http://example.com/x/b"),
        ("?page=2", "http://example.com/list", "http://example.com/list?page=2"),
        ("//cdn.example.com/s", "https://example.com/", "https://cdn.example.com/s"),
        ("#top", "http://example.com/a", "http://example.com/a"),
        ("http://[::1]:8080/x", None, "http://[::1]:8080/x"),
        ("mailto:someone@example.com", "http://example.com/", None),
        ("javascript:alert(1)", "http://example.com/", None),
        ("ftp://example.com/", None, None),
        ("/relative", None, None),
        ("http://example.com:99999/", None, None),
        ("http://example.com/" + "a" * 3000, None, None),
        ("http://93.184.216.34/a\u0000b", None, None),  # PostgreSQL's text refuses NUL
        ("http://example.com/\x07", None, None),
        ("/a\ud800", "http://example.com/", None),  # a lone surrogate
        ("http://example.com/a\n b\t", None, "http://example.com/a b"),  # as browsers drop them
        ("http://example.com/caf\u00e9", None, "http://example.com/caf\u00e9"),
    ],
)
def test_normalise(url: str, base: str | None, expected: str | None) -> None:
    assert urls.normalise(url, base) == expected


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("224.0.0.1", False),
    ],
)
def test_only_public_addresses_are_public(address: str, public: bool) -> None:
    assert urls.is_public(address) is public


def test_check_addresses_refuses_any_private_address_unless_the_host_is_allowed() -> None:
    with pytest.raises(urls.AddressRefused, match=r"10\.0\.0\.1"):
        urls.check_addresses("rebind.example", ["93.184.216.34", "10.0.0.1"], frozenset())
    allowed = urls.parse_hosts(" 127.0.0.1, LocalHost ,")
    assert allowed == {"127.0.0.1", "localhost"}
    urls.check_addresses("localhost", ["127.0.0.1"], allowed)
    urls.check_addresses("example.com", ["93.184.216.34"], frozenset())


def test_parse_takes_title_and_links_in_document_order_once() -> None:
    html = b"""<html><head><title> Hello </title><base href="/docs/"></head><body>
        <a href="b">b</a><a href="/a#x">a</a><a href="b">again</a><a href="mailto:x@y">m</a>
        <a href="HTTP://OTHER.example/">o</a><a>no href</a></body></html>"""
    title, links, count = parse(html, "utf-8", "http://example.com/start")
    assert title == "Hello"
    assert links == ["http://example.com/docs/b", "http://example.com/a", "http://other.example/"]
    assert count == 5


def test_titles_and_links_hold_nothing_postgresql_cannot_store() -> None:
    html = "<title>a&#0;b\u0000c&#xD800;</title><a href='/x\u0000y'>x</a><a href='/ok'>ok</a>"
    title, links, _ = parse(html.encode(), "utf-8", "http://example.com/")
    assert title is not None
    for text in (title, *links):
        assert db.storable(text) == text
    assert db.storable("x\x00y\ud800z") == "x\ufffdy\ufffdz"


async def test_window_orders_each_queue_its_own_way() -> None:
    window = Window()
    for n in range(3):
        window.put(getattr(sentinel, f"fifo{n}"), Frontier.FIFO)
        window.put(getattr(sentinel, f"lifo{n}"), Frontier.LIFO)
    for depth in (2, 0, 1):
        window.put(getattr(sentinel, f"deep{depth}"), Frontier.PRIORITY, depth)
    taken = [await window.get() for _ in range(9)]
    fifo = [m for m in taken if str(m).startswith("sentinel.fifo")]
    lifo = [m for m in taken if str(m).startswith("sentinel.lifo")]
    deep = [m for m in taken if str(m).startswith("sentinel.deep")]
    assert fifo == [sentinel.fifo0, sentinel.fifo1, sentinel.fifo2]
    assert lifo == [sentinel.lifo2, sentinel.lifo1, sentinel.lifo0]
    assert deep == [sentinel.deep0, sentinel.deep1, sentinel.deep2]
    assert taken[:3] != [sentinel.fifo0, sentinel.fifo1, sentinel.fifo2]  # queues take turns


async def test_closing_the_window_wakes_every_runner_and_returns_the_rest() -> None:
    window = Window()
    runners = [asyncio.create_task(window.get()) for _ in range(3)]
    await asyncio.sleep(0)
    assert window.close() == []
    assert await asyncio.gather(*runners) == [None, None, None]
    late = Window()
    late.put(sentinel.a, Frontier.FIFO)
    late.put(sentinel.b, Frontier.LIFO)
    assert sorted(map(str, late.close())) == ["sentinel.a", "sentinel.b"]
    assert await late.get() is None
    late.put(sentinel.c, Frontier.FIFO)  # delivered after the close: still given back
    assert await late.get() is None
    assert late.close() == [sentinel.c]


async def test_deliveries_held_too_long_are_withdrawn_the_oldest_first() -> None:
    window = Window()
    assert window.empty.is_set()
    window.put(sentinel.old0, Frontier.PRIORITY, 9)
    window.put(sentinel.old1, Frontier.LIFO)
    await asyncio.sleep(0.05)
    window.put(sentinel.urgent, Frontier.PRIORITY, -9)
    window.put(sentinel.young, Frontier.FIFO)
    assert not window.empty.is_set()
    assert window.withdraw(0.04) == [sentinel.old0, sentinel.old1]
    assert window.withdraw(0.04) == []
    assert len(window) == 2
    taken = {await window.get(), await window.get()}
    assert taken == {sentinel.urgent, sentinel.young}  # the withdrawn are skipped
    assert window.empty.is_set()
    assert len(window) == 0
    window.put(sentinel.last, Frontier.PRIORITY)
    await asyncio.sleep(0.01)
    assert window.withdraw(0.005) == [sentinel.last]
    assert window.empty.is_set()
    assert window.close() == []


def test_the_crawler_is_told_its_crawl_settings_and_nothing_of_the_order_worker() -> None:
    settings = ConsumerSettings(
        crawl_concurrency=7, crawl_host_delay_ms=0, crawl_allowed_private_hosts="127.0.0.1"
    )
    crawler = settings.crawler
    assert (crawler.concurrency, crawler.host_delay_ms) == (7, 0)
    assert crawler.allowed_private_hosts == "127.0.0.1"
    assert {f"crawl_{name}" for name in type(crawler).model_fields} <= set(
        type(settings).model_fields
    )
    assert not hasattr(crawler, "order_timeout")
