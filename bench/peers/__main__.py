"""``make bench-peers``: Celery, Dramatiq, taskiq and FastStream beside the system, on the same
broker and database, in the same run (docs/performance.md, *Beside the peers*).

For each peer, in its own environment (``BENCH_PEERS_VENV``, by default
``~/.cache/orders/bench-peers``, made from ``requirements.txt`` when it is missing or the file
changed):

- **enqueue**: tasks sent durably from one process, each the peer's own confirmed, persistent way,
  at the concurrency it supports best (one at a time for the blocking clients, 1,000 in flight
  for the async ones);
- **web**: baseline (a)'s FastAPI app with the peer behind ``POST /orders`` (``web.py``), under
  wrk at 16 and 64 connections, as ``make bench`` loads ours;
- **drain**: a backlog consumed by one worker process (the peer's recommended concurrency for
  I/O-bound work within it), once with a no-op task and once with the effect (one stock row
  locked and updated, committed before the ack); and the no-op again with two processes, one a
  core. Timed from the first task taken to the queue's last, by the queue's depth;
- **priority**: urgent tasks (priority 9, 50 a second) posted into a backlog of normal ones,
  with the effect: how long each waited, from when it was sent or the worker started.

And ours in the same run: ``POST /orders`` at both concurrencies, the batch submit, the drain with
the real effect by one consumer and by two (with ``make bench``'s BENCH_PREFETCH and
BENCH_CONCURRENCY), and the priority phase (``bench``'s phases). Each figure is the median of
``--runs`` runs. ``--profile`` instead samples each peer's worker in its no-op drain and its web
server at 64 connections (py-spy), grouped by the innermost library on the stack.
"""

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import httpx
import uvloop

from bench import load
from bench.__main__ import (
    FULL,
    SMOKE,
    Bench,
    Size,
    Watch,
    broker_pids,
    consumers_env,
    database_pids,
    drain,
    per_order,
    percentiles,
    prepare,
    priority,
    server_args,
    submit,
    up,
)
from bench.__main__ import batch_submit as our_batch
from testbed.processes import free_port

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
URGENT_RATE = 50  # urgent tasks a second, as ``bench``'s priority phase posts them


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
    """Runs the peers' enqueues, workers and web apps as processes in their environment."""

    def __init__(
        self, python: Path, amqp_url: str, database_url: str, size: Size, profile: bool = False
    ) -> None:
        self.python, self.amqp_url, self.size, self.profile = python, amqp_url, size, profile
        self.waits = Path(tempfile.mkdtemp(prefix="bench-peers-")) / "waits"
        self.env = {
            **os.environ,
            "PEERS_AMQP_URL": amqp_url,
            "PEERS_DATABASE_URL": database_url,
            "PEERS_WAITS": str(self.waits),
            # The web app validates the project's own model (shared.messages.NewOrder).
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'shared' / 'src'}",
        }
        self.profiles: dict[str, dict[str, float]] = {}

    async def enqueue(
        self, peer: str, task: str, count: int, priority: int = 0, rate: float = 0
    ) -> dict[str, float]:
        """The peer's enqueue of ``count`` tasks: its rate, and its process's CPU per task."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = await asyncio.create_subprocess_exec(
            str(self.python), "-m", "bench.peers.run", "enqueue", peer, task, str(count),
            str(priority), str(rate), env=self.env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            raise RuntimeError(f"{peer} enqueue exited {process.returncode}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rate = float(json.loads(out.splitlines()[-1])["rate"])
        return {"rate": rate, "us_client": cpu / count * 1e6}

    def worker(self, peer: str, processes: int = 1) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(self.python), "-m", "bench.peers.run", "worker", peer, str(processes)],
            env=self.env,
            cwd=ROOT,
            start_new_session=True,  # its pool's processes go with it
            stdout=subprocess.DEVNULL,
        )

    def server(self, peer: str, port: int) -> subprocess.Popen[bytes]:
        """``web.py`` with ``peer`` behind it, served as (a) is."""
        return subprocess.Popen(
            [str(self.python), "-m", "uvicorn", *server_args(port, "bench.peers.web:app")],
            env={**self.env, "PEERS_PEER": peer},
            cwd=ROOT,
            start_new_session=True,
        )

    async def purge(self, queue: str) -> None:
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):  # none yet: the
                await (await channel.get_queue(queue)).purge()  # peer's enqueue declares it

    @contextlib.asynccontextmanager
    async def depth(self, queue: str) -> AsyncIterator[Callable[[], Awaitable[int]]]:
        """A function that reads how many messages ``queue`` holds ready."""
        async with await aio_pika.connect(self.amqp_url) as connection:
            underlay = await (await connection.channel()).get_underlay_channel()

            async def left() -> int:
                result = await underlay.queue_declare(queue, passive=True)
                return int(result.message_count or 0)

            yield left

    async def _started(
        self, peer: str, worker: subprocess.Popen[bytes], left: Callable[[], Awaitable[int]], n: int
    ) -> int:
        """Until the worker has taken its first tasks of the ``n`` queued; what is left then."""
        deadline = time.monotonic() + 60
        while (first := await left()) >= n:  # the worker starting up
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{peer} worker took nothing in 60 s")
            await asyncio.sleep(0.02)
        return first

    async def drain(self, peer: str, task: str, count: int, processes: int = 1) -> dict[str, float]:
        """A backlog of ``count`` consumed by one worker command: tasks per second, and CPU per
        task."""
        queue = QUEUES[peer]
        await self.purge(queue)
        await self.enqueue(peer, task, count)
        worker = self.worker(peer, processes)
        watch = Watch(
            {"worker": lambda: _tree(worker.pid), "broker": broker_pids, "database": database_pids}
        )
        try:
            async with self.depth(queue) as left:
                first = await self._started(peer, worker, left, count)
                if first == 0:
                    raise RuntimeError(f"{peer}: the backlog is not larger than its prefetch")
                deadline = time.monotonic() + 600
                started = time.perf_counter()
                with watch.running(), self.profiled(f"{peer} worker", worker.pid, task == "noop"):
                    while (remaining := await left()) > 0:
                        if worker.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"{peer} worker stopped with {remaining} left")
                        await asyncio.sleep(0.02)
                took = time.perf_counter() - started
        finally:
            _stop(worker)
        # The clock runs from the first task taken to the last one taken: those the worker held
        # at either end are not counted, nor is its start-up.
        return {
            "rate": first / took,
            **{f"us_{g}": c * watch.wall / first * 1e6 for g, c in watch.cpu.items()},
        }

    async def web(self, peer: str, connections: int) -> dict[str, float]:
        """(a)'s app with the peer behind it, under wrk: accepted orders/s, CPU per order."""
        port = free_port()
        server = self.server(peer, port)
        watch = Watch({"server": lambda: [server.pid], "broker": broker_pids})
        try:
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 60
                while not await up(client, f"http://127.0.0.1:{port}/docs"):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{peer} web app did not start")
                    await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{port}/orders"
            with watch.running(), self.profiled(f"{peer} web", server.pid, connections == 64):
                result = await load.wrk(url, connections, self.size.seconds)
        finally:
            _stop(server)
        await self.purge(QUEUES[peer])
        if result["errors"]:
            print(f"bench-peers: {peer} web: {result['errors']:.0f} errors", file=sys.stderr)
        return {**result, **per_order(watch, result["rate"])}

    async def priority(self, peer: str) -> dict[str, float]:
        """Urgent tasks posted into a backlog, both with the effect: how long each waited."""
        backlog, urgent = self.size.priority_backlog, self.size.urgent
        queue = QUEUES[peer]
        await self.purge(queue)
        self.waits.write_text("")
        await self.enqueue(peer, "timed", backlog)
        started = time.time()
        worker = self.worker(peer)
        try:
            async with self.depth(queue) as left:
                await self._started(peer, worker, left, backlog)
                await self.enqueue(peer, "timed", urgent, priority=9, rate=URGENT_RATE)
                deadline = time.monotonic() + 600
                while len(self.waits.read_text().splitlines()) < backlog + urgent:
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{peer} worker stopped before every task was done")
                    await asyncio.sleep(0.05)
        finally:
            _stop(worker)
        waits: dict[int, list[float]] = {0: [], 9: []}
        for line in self.waits.read_text().splitlines():
            level, sent, done = line.split()
            waits[int(level)].append((float(done) - max(float(sent), started)) * 1000)
        urgent_ms, normal_ms = percentiles(waits[9]), percentiles(waits[0])
        return {
            "p9_p50_ms": urgent_ms["p50_ms"],
            "p9_p99_ms": urgent_ms["p99_ms"],
            "p0_p50_ms": normal_ms["p50_ms"],
            "p0_p99_ms": normal_ms["p99_ms"],
        }

    @contextlib.contextmanager
    def profiled(self, name: str, pid: int, wanted: bool) -> Iterator[None]:
        """With ``--profile``: py-spy samples ``pid`` and its children meanwhile."""
        if not (self.profile and wanted):
            yield
            return
        out = self.waits.with_name(f"{name.replace(' ', '-')}.txt")
        recorder = subprocess.Popen(
            [str(VENV / "bin" / "py-spy"), "record", "--pid", str(pid), "--subprocesses",
             "--rate", "200", "--nonblocking", "--full-filenames", "--format", "raw",
             "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield
        finally:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(60)
            self.profiles[name] = innermost_libraries(out.read_text())


def innermost_libraries(raw: str) -> dict[str, float]:
    """py-spy's collapsed stacks: the share of samples by the library of the innermost frame
    (an installed package, a module of Python's own, or the benchmark's tasks)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        path = frame[frame.rfind("(") + 1 :].split(":")[0]
        if "site-packages/" in path:
            library = path.split("site-packages/")[1].split("/")[0].removesuffix(".py")
        elif "/bench/" in path:
            library = "the benchmark's tasks"
        elif "/lib/python3" in path:
            library = "python: " + path.split("/lib/python3")[1].split("/")[1].removesuffix(".py")
        else:
            library = "other"
        counts[library] += int(count)
    total = sum(counts.values()) or 1
    return {library: n / total for library, n in counts.most_common()}


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


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process's whole session: what its workers took and did not ack goes back."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


Phase = Callable[[], Awaitable[dict[str, float]]]


def phases(peers: Peers, bench: Bench) -> dict[str, Phase]:
    """Each figure's phase, by the figure's name."""
    size = bench.size
    enqueued = 200 if size is SMOKE else 5_000
    backlog = size.backlog if size is SMOKE else 20_000
    found: dict[str, Phase] = {}
    for peer in PEERS:
        if peers.profile:
            found[f"{peer} drain no-op"] = lambda p=peer: peers.drain(p, "noop", backlog)
            found[f"{peer} web c=64"] = lambda p=peer: peers.web(p, 64)
            continue
        found[f"{peer} enqueue"] = lambda p=peer: peers.enqueue(p, "noop", enqueued)
        found[f"{peer} web c=16"] = lambda p=peer: peers.web(p, 16)
        found[f"{peer} web c=64"] = lambda p=peer: peers.web(p, 64)
        found[f"{peer} drain no-op"] = lambda p=peer: peers.drain(p, "noop", backlog)
        found[f"{peer} drain effect"] = lambda p=peer: peers.drain(p, "effect", backlog)
        found[f"{peer} drain no-op, 2 processes"] = lambda p=peer: peers.drain(
            p, "noop", backlog, processes=2
        )
        found[f"{peer} priority"] = lambda p=peer: peers.priority(p)
    if not peers.profile:
        found["ours POST /orders c=16"] = lambda: submit(bench, 16)
        found["ours POST /orders c=64"] = lambda: submit(bench, 64)
        found["ours batch submit"] = lambda: our_batch(bench)
        found["ours drain effect"] = lambda: drain(bench, 1, backlog)
        found["ours drain effect, 2 consumers"] = lambda: drain(bench, 2, backlog)
        found["ours priority"] = lambda: priority(bench)
    return found


async def measure(peers: Peers, bench: Bench, runs: int, only: tuple[str, ...] = ()) -> list[str]:
    """Every phase ``runs`` times, interleaved; the tables, or when profiling the profiles."""
    found = phases(peers, bench)
    if only:
        found = {name: phase for name, phase in found.items() if name.startswith(only)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in found}
    for run in range(runs):
        for name, phase in found.items():
            print(f"bench-peers: run {run + 1}/{runs} {name}", file=sys.stderr, flush=True)
            await bench.reset()
            try:
                results[name].append(await phase())
            finally:
                await bench.stop_all()
    return profiles(peers.profiles) if peers.profile else table(results)


def _median(values: list[float]) -> str:
    med = statistics.median(values)
    digits = 0 if med >= 100 else 1
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


# What each kind of figure is compared with, and the target for ours ÷ it, if any.
AGAINST: dict[str, tuple[str, float | None]] = {
    "enqueue": ("ours POST /orders c=64", 1.2),
    "web c=16": ("ours POST /orders c=16", 2.0),
    "web c=64": ("ours POST /orders c=64", 2.0),
    "drain no-op": ("ours drain effect", 1.3),
    "drain effect": ("ours drain effect", 3.0),
    "drain no-op, 2 processes": ("ours drain effect, 2 consumers", None),
}


def table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """The figures with ours ÷ each peer's and its target; then the priority phase's waits."""
    rate = {
        name: statistics.median(r["rate"] for r in runs)
        for name, runs in results.items()
        if "rate" in runs[0]
    }
    lines = [
        "| figure | tasks/s: median (min–max) | CPU per task | ours ÷ it | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        if name not in rate:
            continue
        cpu = ", ".join(
            f"{k[3:]} {statistics.median(r[k] for r in runs):,.0f} µs"
            for k in sorted(runs[0])
            if k.startswith("us_")
        )
        kind = name.split(" ", 1)[1]
        ratio = target = met = ""
        ours, need = AGAINST.get(kind, ("", None))
        if ours in rate and not name.startswith("ours"):
            ratio = f"{rate[ours] / rate[name]:.2f}x"
            if need:
                target = f"≥ {need}x"
                met = "yes" if rate[ours] / rate[name] >= need else "**no**"
        median = _median([r["rate"] for r in runs])
        lines.append(f"| {name} | {median} | {cpu} | {ratio} | {target} | {met} |")
    lines += [
        "",
        "| priority: urgent in a backlog | priority 9 wait, ms: p50 / p99 |"
        " priority 0 wait, ms: p50 / p99 | p99: 9 ÷ 0 |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        if name.endswith(" priority"):
            p9, p0 = (statistics.median(r[f"p{n}_p99_ms"] for r in runs) for n in (9, 0))
            waits = [
                " / ".join(_median([r[f"p{n}_{q}_ms"] for r in runs]) for q in ("p50", "p99"))
                for n in (9, 0)
            ]
            lines.append(f"| {name} | {waits[0]} | {waits[1]} | {p9 / p0:.1%} |")
    return lines


def profiles(found: dict[str, dict[str, float]]) -> list[str]:
    """Each profile's ten largest shares."""
    lines = []
    for name, shares in found.items():
        top = ", ".join(f"{library} {share:.0%}" for library, share in list(shares.items())[:10])
        lines.append(f"{name}: {top}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one run: it works")
    parser.add_argument("--profile", action="store_true", help="one pass, py-spy on each peer")
    parser.add_argument("--only", help="the figures whose names start so, separated by commas")
    args = parser.parse_args()
    python = ensure_venv()
    amqp_url = os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/orders_bench"
    )
    database_url = os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/orders_bench"
    )
    prepare(amqp_url, database_url)
    size = SMOKE if args.smoke else FULL
    consumer_env = consumers_env()
    bench = Bench(amqp_url, database_url, size, consumer_env)
    peers = Peers(python, amqp_url, database_url, size, args.profile)
    runs = 1 if args.smoke or args.profile else args.runs
    only = tuple(args.only.split(",")) if args.only else ()
    if not args.profile:
        print(
            f"ours: consumers with PREFETCH={consumer_env['PREFETCH']}"
            f" CONCURRENCY={consumer_env['CONCURRENCY']} in the drains\n"
        )
    print("\n".join(uvloop.run(measure(peers, bench, runs, only))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
