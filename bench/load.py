"""Load: wrk for closed-loop throughput, and a paced open-loop HTTP client for latency at a rate."""

import asyncio
import gc
import json
import os
import re
import resource
import shutil
import time
from pathlib import Path

from testbed.processes import API_KEY

LUA = Path(__file__).with_name("submit.lua")


async def wrk(url: str, connections: int, seconds: float) -> dict[str, float]:
    """POST /orders for ``seconds`` with ``connections`` open: accepted/s, latency in ms, and
    the CPU time wrk itself used per accepted request (``us_wrk``)."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk")
    process = await asyncio.create_subprocess_exec(
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "ORDERS_API_KEY": API_KEY},
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, _ = await process.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child waited for
    found = re.search(rb"WRK (\{.*\})", out)
    if not found:
        raise RuntimeError(f"wrk printed no result: {out.decode(errors='replace')}")
    r = json.loads(found.group(1))
    accepted = r["requests"] - r["status_errors"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "rate": accepted / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": r["status_errors"] + r["socket_errors"],
        "us_wrk": cpu / max(accepted, 1) * 1e6,
    }


async def paced(host: str, port: int, bodies: list[bytes], rate: float) -> int:
    """Send each body as POST /orders at ``rate`` per second on keep-alive connections; 202s.

    The garbage collector is off while it sends: a full pass over this process's objects took
    about 40 ms, and the requests due meanwhile went out as one burst, which was the largest
    cluster of slow orders in the end-to-end tail (docs/performance-history.md). wrk, in C, has
    no such pause."""
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    accepted = 0

    async def one(body: bytes) -> None:
        nonlocal accepted
        if idle.empty():
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = idle.get_nowait()
        writer.write(
            b"POST /orders HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"X-API-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        accepted += head.startswith(b"HTTP/1.1 202")
        idle.put_nowait((reader, writer))

    started = time.perf_counter()
    tasks = []
    gc.disable()
    try:
        for i, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    while not idle.empty():
        idle.get_nowait()[1].close()
    return accepted
