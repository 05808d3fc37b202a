"""``make bench-peers``: Celery, Dramatiq, taskiq and FastStream beside the system, on the same
broker and database, in the same run (docs/performance.md, *Beside the peers*).

For each peer, in its own environment (``BENCH_PEERS_VENV``, by default
``~/.cache/orders/bench-peers``, made from ``requirements.txt`` when it is missing or the file
changed):

- **enqueue**: tasks sent durably from one process, each the peer's own confirmed, persistent way,
  at the concurrency it supports best (one at a time for the blocking clients, 1,000 in flight
  for the async ones);
- **drain**: a backlog consumed by one worker (the peer's recommended setup for I/O-bound work),
  once with a no-op task and once with the effect (one stock row locked and updated, committed
  before the ack). Timed from the first task taken to the queue's last, by the queue's depth.

And ours in the same run: the batch submit (the fastest durable way in) and the one-consumer
drain with the real effect (``bench``'s phases). Each figure is the median of ``--runs`` runs.
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import uvloop

from bench.__main__ import FULL, SMOKE, Bench, Watch, broker_pids, database_pids, drain, prepare
from bench.__main__ import batch_submit as our_batch

ROOT = Path(__file__).resolve().parents[2]
# Kept between runs (and between clones of the repository) on this machine: made once.
VENV = Path(os.environ.get("BENCH_PEERS_VENV", Path.home() / ".cache/orders/bench-peers"))
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
PEERS = ("celery", "dramatiq", "taskiq", "faststream")
QUEUES = {
    "celery": "peers.celery",
    "dramatiq": "peers_dramatiq",
    "taskiq": "peers.taskiq",
    "faststream": "peers.faststream",
}


def ensure_venv() -> Path:
    """The peers' Python, installed from ``requirements.txt`` if it is not yet."""
    python = VENV / "bin" / "python"
    marker = VENV / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not python.exists() or not marker.exists() or marker.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        marker.write_text(wanted)
    return python


class Peers:
    """Runs the peers' enqueues and workers as processes in their environment."""

    def __init__(self, python: Path, amqp_url: str, database_url: str) -> None:
        self.python, self.amqp_url = python, amqp_url
        self.env = {
            **os.environ,
            "PEERS_AMQP_URL": amqp_url,
            "PEERS_DATABASE_URL": database_url,
            "PYTHONPATH": str(ROOT),
        }

    async def enqueue(self, peer: str, task: str, count: int) -> dict[str, float]:
        """The peer's enqueue of ``count`` tasks: its rate, and its process's CPU per task."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = await asyncio.create_subprocess_exec(
            str(self.python), "-m", "bench.peers.run", "enqueue", peer, task, str(count),
            env=self.env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            raise RuntimeError(f"{peer} enqueue exited {process.returncode}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rate = float(json.loads(out.splitlines()[-1])["rate"])
        return {"rate": rate, "us_client": cpu / count * 1e6}

    def worker(self, peer: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(self.python), "-m", "bench.peers.run", "worker", peer],
            env=self.env,
            cwd=ROOT,
            start_new_session=True,  # its pool's processes go with it
            stdout=subprocess.DEVNULL,
        )

    async def purge(self, queue: str) -> None:
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):  # none yet: the
                await (await channel.get_queue(queue)).purge()  # peer's enqueue declares it

    async def drain(self, peer: str, task: str, count: int) -> dict[str, float]:
        """A backlog of ``count`` consumed by one worker: tasks per second, and CPU per task."""
        queue = QUEUES[peer]
        await self.purge(queue)
        await self.enqueue(peer, task, count)
        worker = self.worker(peer)
        watch = Watch(
            {"worker": lambda: _tree(worker.pid), "broker": broker_pids, "database": database_pids}
        )
        try:
            async with await aio_pika.connect(self.amqp_url) as connection:
                underlay = await (await connection.channel()).get_underlay_channel()

                async def left() -> int:
                    result = await underlay.queue_declare(queue, passive=True)
                    return int(result.message_count or 0)

                deadline = time.monotonic() + 60
                while (first := await left()) >= count:  # the worker starting up
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{peer} worker took nothing in 60 s")
                    await asyncio.sleep(0.02)
                if first == 0:
                    raise RuntimeError(f"{peer}: the backlog is not larger than its prefetch")
                deadline = time.monotonic() + 600
                started = time.perf_counter()
                with watch.running():
                    while (remaining := await left()) > 0:
                        if worker.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"{peer} worker stopped with {remaining} left")
                        await asyncio.sleep(0.02)
                took = time.perf_counter() - started
        finally:
            _stop(worker)
        # The clock runs from the first task taken to the last one taken: those the worker held
        # at either end are not counted, nor is its start-up.
        done = first
        return {
            "rate": done / took,
            **{f"us_{g}": c * watch.wall / done * 1e6 for g, c in watch.cpu.items()},
        }


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])  # noqa: SIM115
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's whole session: what it took and did not ack goes back."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(30)


Phase = Callable[[], Awaitable[dict[str, float]]]


async def measure(peers: Peers, bench: Bench, runs: int, smoke: bool) -> list[str]:
    """Every phase ``runs`` times, interleaved; one line per figure: its median, min and max."""
    enqueued = 200 if smoke else 5_000
    backlog = 300 if smoke else 20_000
    phases: dict[str, Phase] = {}
    for peer in PEERS:
        phases[f"{peer} enqueue"] = lambda p=peer: peers.enqueue(p, "noop", enqueued)
        phases[f"{peer} drain no-op"] = lambda p=peer: peers.drain(p, "noop", backlog)
        phases[f"{peer} drain effect"] = lambda p=peer: peers.drain(p, "effect", backlog)
    phases["ours batch submit"] = lambda: our_batch(bench)
    phases["ours drain effect"] = lambda: drain(bench, 1, backlog)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in phases}
    for run in range(runs):
        for name, phase in phases.items():
            print(f"bench-peers: run {run + 1}/{runs} {name}", file=sys.stderr, flush=True)
            await bench.reset()
            try:
                results[name].append(await phase())
            finally:
                await bench.stop_all()
    return table(results)


def _median(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """The figures, and ours ÷ each peer's."""
    rate = {name: statistics.median(r["rate"] for r in runs) for name, runs in results.items()}
    lines = [
        "| figure | tasks/s: median (min–max) | CPU per task | ours ÷ it |",
        "|---|---|---|---|",
    ]
    ours = {"enqueue": rate["ours batch submit"], "drain": rate["ours drain effect"]}
    for name, runs in results.items():
        cpu = ", ".join(
            f"{k[3:]} {statistics.median(r[k] for r in runs):,.0f} µs"
            for k in sorted(runs[0])
            if k.startswith("us_")
        )
        kind = "enqueue" if "enqueue" in name or "submit" in name else "drain"
        ratio = "" if name.startswith("ours") else f"{ours[kind] / rate[name]:.2f}x"
        lines.append(f"| {name} | {_median([r['rate'] for r in runs])} | {cpu} | {ratio} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one run: it works")
    args = parser.parse_args()
    python = ensure_venv()
    amqp_url = os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/orders_bench"
    )
    database_url = os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/orders_bench"
    )
    prepare(amqp_url, database_url)
    consumer_env = {"PREFETCH": "512", "CONCURRENCY": "128", "ORDER_WORK_MS": "0"}
    bench = Bench(amqp_url, database_url, SMOKE if args.smoke else FULL, consumer_env)
    lines = uvloop.run(measure(Peers(python, amqp_url, database_url), bench,
                               1 if args.smoke else args.runs, args.smoke))  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
