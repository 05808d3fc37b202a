"""The dashboard in a real browser: headless Chromium shows the counts move while orders flow."""

import asyncio
import shutil
import tempfile

import asyncpg
import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

from testbed.processes import ARTIFACTS
from tests.integration.conftest import settled, wait_until


def browser() -> webdriver.Chrome:
    """Debian's chromium and chromedriver, headless, with nothing fetched from the network."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium, "install Debian's chromium (.ci/run does)"
    assert driver, "install Debian's chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(executable_path=driver), options=options)


async def test_dashboard_counts_update_while_orders_flow(spawn, conn: asyncpg.Connection) -> None:
    producer = spawn("producer", "producer-dashboard", DEMO_CATALOGUE="true")
    await producer.wait_healthy()
    spawn("consumer", "consumer-dashboard", ORDER_WORK_MS="50")
    chrome = await asyncio.to_thread(browser)
    try:
        await asyncio.to_thread(chrome.get, f"{producer.base_url}/dashboard")

        async def text(element_id: str) -> str | None:
            """One atomic read: the page re-renders on each update the producer pushes."""
            script = "return document.getElementById(arguments[0])?.textContent || null"
            found: str | None = await asyncio.to_thread(chrome.execute_script, script, element_id)
            return found

        assert await wait_until(lambda: text("count-completed"), 20, "the page to render") == "0"
        async with producer.client() as client:
            body = {"customer_id": "dash", "items": [{"sku": "TSHIRT-M", "quantity": 150}]}
            ids = [(await client.post("/orders", json=body)).json()["id"] for _ in range(12)]
        await settled(conn, ids)

        async def shows(element_id: str, n: str) -> bool:
            return await text(element_id) == n

        await wait_until(lambda: shows("count-completed", "1"), 20, "1 completed on the page")
        await wait_until(lambda: shows("count-rejected", "11"), 20, "11 rejected on the page")
        assert "insufficient stock: TSHIRT-M" in (await text("failures") or "")
        async with producer.client() as client:  # pushed by /dashboard/events, never polled
            metrics = (await client.get("/metrics")).text
        assert 'handler="/dashboard/data"' not in metrics
        ARTIFACTS.mkdir(exist_ok=True)
        await asyncio.to_thread(chrome.save_screenshot, str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    finally:
        await asyncio.to_thread(chrome.quit)


async def test_dashboard_data_is_json(api: httpx.AsyncClient) -> None:
    data = (await api.get("/dashboard/data")).json()
    assert set(data) >= {"counts", "queues", "outbox", "throughput", "failures", "broker"}
    page = await api.get("/dashboard")
    assert page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # no CDN
