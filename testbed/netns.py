"""Hosts of a test's own on this machine: network namespaces on a bridge, each a machine apart
that a test can cut off from the others. For the fault suite's clusters and the benchmark's.
(Only ever for namespaces a test made: nothing here touches the machine's own network.)"""

import asyncio
import contextlib
import os
import signal
from pathlib import Path


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a command; its output, or an error naming the command. One that times out is killed
    with whatever it started (its session) and reaped, so that nothing holds its output open."""
    process = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.communicate(), 10)
        raise RuntimeError(f"{' '.join(args)} timed out after {timeout}s") from None
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {process.returncode}: {text}")
    return text


def alive(pid: int) -> bool:
    """``pid`` runs: it exists and is not a zombie (a child of ours not yet reaped is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Host:
    """A machine of a cluster's own: a network namespace on a bridge of the test's
    (``10.232.0.0/24``), with a name that the Debian 13 root resolves (its ``/etc/hosts``).
    Taking its link down cuts it off from the other hosts and from every client at once."""

    BRIDGE, NETWORK = "orders-fbr", "10.232.0"

    def __init__(self, number: int) -> None:
        self.name = f"orders-fh{number}"  # the namespace's and the host's
        self.address = f"{self.NETWORK}.{10 + number}"
        self.link = f"orders-fv{number}"  # the bridge's end of its veth pair

    def exec(self, *args: str) -> tuple[str, ...]:
        """``args`` as a command run inside the namespace, under the host's name (a CLI node is
        named after the host it runs on, and the nodes it talks to connect back to that name)."""
        named = ("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name)
        return ("ip", "netns", "exec", self.name, *named, *args)

    async def create(self) -> None:
        await self.remove()  # what an interrupted run left
        with contextlib.suppress(RuntimeError):  # the bridge is there already
            await run("ip", "link", "add", self.BRIDGE, "type", "bridge")
            await run("ip", "addr", "add", f"{self.NETWORK}.1/24", "dev", self.BRIDGE)
        await run("ip", "link", "set", self.BRIDGE, "up")
        await run("ip", "netns", "add", self.name)
        await run(
            "ip",
            "link",
            "add",
            self.link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.name,
        )
        await run("ip", "link", "set", self.link, "master", self.BRIDGE, "up")
        await run("ip", "-n", self.name, "addr", "add", f"{self.address}/24", "dev", "eth0")
        await run("ip", "-n", self.name, "link", "set", "eth0", "up")
        await run("ip", "-n", self.name, "link", "set", "lo", "up")
        hosts = Path(os.environ["RABBITMQ4_ROOT"]) / "etc" / "hosts"
        entry = f"{self.address} {self.name}\n"
        if entry not in hosts.read_text():
            with hosts.open("a") as file:
                file.write(entry)

    async def kill_all(self) -> None:
        """SIGKILL everything that runs in the namespace, and wait until it is gone: the machine
        dies."""
        pids = [int(pid) for pid in (await run("ip", "netns", "pids", self.name)).split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while any(alive(pid) for pid in pids):
            await asyncio.sleep(0.1)

    async def cut(self) -> None:
        await run("ip", "link", "set", self.link, "down")

    async def heal(self) -> None:
        await run("ip", "link", "set", self.link, "up")

    async def remove(self) -> None:
        """Kill what still runs in the namespace (epmd outlives its node), then delete it."""
        with contextlib.suppress(RuntimeError):
            await self.kill_all()
            await run("ip", "netns", "del", self.name)
        with contextlib.suppress(
            RuntimeError
        ):  # gone with the namespace, unless a run was cut short
            await run("ip", "link", "del", self.link)

    @classmethod
    async def remove_bridge(cls) -> None:
        with contextlib.suppress(RuntimeError):
            await run("ip", "link", "del", cls.BRIDGE)
