"""The services as real processes (``python -m producer``, ``python -m consumer``).

What a process did is read from its JSON log lines' ``event`` field (shared/logs.py), never from
the wording of a message."""

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
API_KEY = "test-api-key"  # the key every test producer accepts (not a secret: tests only)
AUTH = {"X-API-Key": API_KEY}


def free_port() -> int:
    """A port free now, below the kernel's range for outgoing connections' own ports. A server
    restarted on it (a fault node after a kill) then cannot find it taken by a connection, not
    even by a client's that, reconnecting to it while nothing listened, connected to itself."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        # (a range that leaves no room below it: any port the kernel hands out)
        port = random.randrange(10_000, ephemeral) if ephemeral > 11_000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])


class Service:
    """One service process; its output goes to ``test-artifacts/<name>.log``."""

    def __init__(
        self, module: str, name: str, env: dict[str, str], args: tuple[str, ...] = ()
    ) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.module, self.name = module, name
        self.log_path = ARTIFACTS / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The JSON log lines whose ``event`` is one of ``names``, in order; a line still being
        written (no newline yet) waits for the next read."""
        text = self.log()
        complete = text[: text.rfind("\n") + 1]
        lines = (line for line in complete.splitlines() if line.startswith("{"))
        return [e for e in map(orjson.loads, lines) if e.get("event") in names]

    async def wait_for_event(self, name: str, timeout: float = 30, **facts: Any) -> None:
        """Until a line with ``event`` ``name`` whose fields hold ``facts`` (a value, or a list
        that contains it)."""

        def holds(line: dict[str, Any]) -> bool:
            return all(
                value == line.get(key) or value in (line.get(key) or ())
                for key, value in facts.items()
            )

        deadline = time.monotonic() + timeout
        while not any(holds(line) for line in self.events(name)):
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never logged {name} {facts}:\n{self.log()}")
            await asyncio.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.1)
        return code

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()


class Producer(Service):
    def __init__(self, name: str, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        keyed = {"API_KEYS": f"tests:{API_KEY}", "RATE_LIMIT_PER_SECOND": "0"}
        env = {**keyed, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        super().__init__("producer", name, env)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client for this producer that sends the test API key."""
        return httpx.AsyncClient(base_url=self.base_url, headers=AUTH, **kwargs)

    async def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not become healthy:\n{self.log()}")
                await asyncio.sleep(0.1)


class Relay(Service):
    """``python -m producer relay``: the outbox relay alone, its metrics on ``port``."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.port = free_port()
        env = {**env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        super().__init__("producer", name, env, ("relay",))
