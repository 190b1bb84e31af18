"""Benchmark relier_bridge against the other ways of running a coroutine from sync code.

Needs Linux (it reads /proc and pins threads to a CPU), the ``bench`` extra (asgiref,
anyio, redis) and a Redis server at ``$RELIER_BENCH_REDIS`` (default
redis://127.0.0.1:6379/3; the run keeps its queues, results and one key in that database)::

    python bench_relier_bridge.py            # full run, about 3 to 4 minutes
    python bench_relier_bridge.py --quick    # smoke run with tiny N, well under a minute
    python bench_relier_bridge.py --parts 1,5

Every comparison is measured side by side in the same run: each round runs every contender
once, in an order rotated from round to round, and the table shows each contender's median
over the rounds. A ratio is the median over rounds of (contender / baseline) within the
same round, so slow drifts in the machine's load cancel out. Targets are reported as
pass/miss; a miss never fails the run.

This file is also the Celery app that the benchmark's workers load (``celery -A
bench_relier_bridge``): the tasks are defined at import time, and ``main`` runs only when
the file is executed as a script.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Optional, Union

import anyio.from_thread
import celery
import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from celery import Celery, group

import relier_bridge
from relier_bridge import SoftContext, bridged_task

HERE = Path(__file__).resolve().parent
MODULE = "bench_relier_bridge"  # the name the workers import this file under
REDIS_URL = os.environ.get("RELIER_BENCH_REDIS", "redis://127.0.0.1:6379/3")
REDIS_KEY = "relier_bench:value"  # what the client-reuse tasks GET
REDIS_VALUE = "bench"
IO_SLEEP_S = 0.05  # the "I/O" of the concurrency benchmark
# Fixed queue names, purged before each worker starts, so that messages an interrupted run
# left behind are never counted.
E2E_QUEUE = "relier_bench.prefork"
THREADS_QUEUE = "relier_bench.threads"
PREFORK_IO_QUEUE = "relier_bench.prefork_io"

app = Celery(MODULE, broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,  # the run reads every result within seconds; let Redis drop them
)

# The workers run at INFO so that they print their "ready." line, but two log lines per task
# ("received", "succeeded") would put log formatting into every throughput figure. The
# worker reads both levels when it builds its per-task code, after importing this module.
for _chatty_logger in ("celery.app.trace", "celery.worker.strategy"):
    logging.getLogger(_chatty_logger).setLevel(logging.WARNING)


# --- the work being measured -------------------------------------------------------------

async def trivial() -> int:
    """The coroutine of the per-call benchmark: all overhead, no work."""
    return 1


def note_soft_timeout(ctx: SoftContext) -> None:
    """An on_soft hook, so that arming the timeouts costs what it costs in real use."""
    ctx.set_partial("soft timeout reached")


@bridged_task(app=app, name="bench.bridged_trivial")
async def bridged_trivial() -> int:
    return 1


@bridged_task(app=app, name="bench.bridged_trivial_timed", soft_timeout=30, hard_timeout=60,
              on_soft=note_soft_timeout)
async def bridged_trivial_timed() -> int:
    return 1


@bridged_task(app=app, name="bench.bridged_running_loop")
async def bridged_running_loop() -> asyncio.AbstractEventLoop:
    """Probe: the loop a bridged coroutine runs on (called in-process only)."""
    return asyncio.get_running_loop()


@app.task(name="bench.sync_trivial")
def sync_trivial() -> int:
    return 1


@app.task(name="bench.asyncio_run_trivial")
def asyncio_run_trivial() -> int:
    return asyncio.run(trivial())


# One redis.asyncio client per event loop: a client's connections belong to the loop they
# were opened on, and the bridge gives each worker process one loop that outlives its tasks.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
    weakref.WeakKeyDictionary())


def client_for_running_loop() -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    return client


@bridged_task(app=app, name="bench.bridged_redis_get")
async def bridged_redis_get() -> Union[str, bytes, None]:
    return await client_for_running_loop().get(REDIS_KEY)


async def get_with_fresh_client() -> Union[str, bytes, None]:
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return await client.get(REDIS_KEY)
    finally:
        await client.aclose()


@app.task(name="bench.asyncio_run_redis_get")
def asyncio_run_redis_get() -> Union[str, bytes, None]:
    return asyncio.run(get_with_fresh_client())


@bridged_task(app=app, name="bench.bridged_io_sleep")
async def bridged_io_sleep() -> int:
    await asyncio.sleep(IO_SLEEP_S)
    return 1


# --- measuring and reporting -------------------------------------------------------------

@dataclass
class Settings:
    rounds: int  # interleaved rounds per comparison with workers (plus a warm-up round)
    call_rounds: int  # the same for part 1, whose rounds take well under a second
    calls_per_sample: int  # part 1: calls timed together, to rise above timer resolution
    e2e_tasks: int  # parts 2 and 3: tasks per round
    io_tasks_threads: int  # part 4: tasks per round, sized so that a round lasts 1 to 3 s
    io_tasks_prefork: int
    rss_probes: int  # part 5: fresh processes measured


FULL = Settings(rounds=15, call_rounds=31, calls_per_sample=300, e2e_tasks=500,
                io_tasks_threads=1000, io_tasks_prefork=100, rss_probes=7)
QUICK = Settings(rounds=3, call_rounds=3, calls_per_sample=100, e2e_tasks=100,
                 io_tasks_threads=200, io_tasks_prefork=20, rss_probes=2)

# contender -> one value per round; the lists are aligned, index i is round i.
Samples = dict[str, list[float]]


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> Samples:
    """Run each contender once per round, rotating the order; one sample per run.

    A warm-up round runs first and is discarded (first-call imports, lazy loops, caches).
    Rotating the order keeps any contender from always running after the same neighbour,
    and interleaving spreads slow drifts (other load on the machine) over all of them.
    """
    names = list(contenders)
    samples: Samples = {name: [] for name in names}
    for round_no in range(rounds + 1):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            value = contenders[name]()
            if round_no > 0:
                samples[name].append(value)
    return samples


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Median, p25 and p75."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    p25, median, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return median, p25, p75


def paired_ratio(samples: Samples, name: str, baseline: str) -> float:
    """Median over rounds of name / baseline, each pair measured in the same round."""
    return statistics.median(value / base
                             for value, base in zip(samples[name], samples[baseline]))


@dataclass
class Row:
    label: str
    median: float
    p25: float
    p75: float
    unit: str
    ratio: Optional[float] = None  # to the section's baseline
    note: str = ""


@dataclass
class Section:
    title: str
    rows: list[Row]
    ratio_header: str = ""


@dataclass
class Target:
    label: str
    measured: float  # a ratio
    goal: float
    at_least: bool  # True: passes when measured >= goal; False: when measured <= goal

    @property
    def passed(self) -> bool:
        return self.measured >= self.goal if self.at_least else self.measured <= self.goal


def rows_from(samples: Samples, unit: str, baseline: str,
              notes: Optional[dict[str, str]] = None) -> list[Row]:
    rows = []
    for name, values in samples.items():
        median, p25, p75 = quartiles(values)
        rows.append(Row(name, median, p25, p75, unit, paired_ratio(samples, name, baseline),
                        (notes or {}).get(name, "")))
    return rows


def print_section(section: Section) -> None:
    if not section.rows:
        return
    print(f"\n{section.title}")
    print(f"  {'contender':<42} {'median':>9} {'unit':<8} {'p25..p75':>16} "
          f"{section.ratio_header:>13}  note")
    for row in section.rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        iqr = f"{row.p25:.1f}..{row.p75:.1f}" if row.p25 != row.p75 else ""
        print(f"  {row.label:<42} {row.median:>9.1f} {row.unit:<8} {iqr:>16} {ratio:>13}  "
              f"{row.note}".rstrip())


def print_targets(targets: list[Target]) -> None:
    if not targets:
        return
    print("\ntargets (ratios as in the table; a miss does not fail the run)")
    print(f"  {'target':<48} {'measured':>9} {'goal':>8}  result")
    for target in targets:
        goal = f"{'>=' if target.at_least else '<='}{target.goal:.2f}x"
        print(f"  {target.label:<48} {target.measured:>8.3f}x {goal:>8}  "
              f"{'pass' if target.passed else 'MISS'}")


# --- part 1: per-call overhead in one process --------------------------------------------

PING_PONG = "bare thread ping-pong (2 locks)"
BRIDGE = "relier_bridge"
BRIDGE_TIMED = "relier_bridge, timeouts armed"
PER_CALL_NOTES = {
    PING_PONG: "no coroutine at all: the limit",
    BRIDGE: "task.run under a worker request",
    BRIDGE_TIMED: "soft 30 s, hard 60 s, on_soft hook",
}


class LockPingPong:
    """Two threads handing a call over and back through two locks: the floor of a hop."""

    def __init__(self) -> None:
        self._request, self._reply = threading.Lock(), threading.Lock()
        self._request.acquire()
        self._reply.acquire()
        self._value = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="bench-ping-pong", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._request.acquire()
            if self._stopping:
                return
            self._value = 1
            self._reply.release()

    def call(self) -> int:
        self._request.release()
        self._reply.acquire()
        return self._value

    def close(self) -> None:
        self._stopping = True
        self._request.release()
        self._thread.join()


class PersistentLoop:
    """A plain event loop in a daemon thread, fed with asyncio.run_coroutine_threadsafe."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-loop",
                                        daemon=True)
        self._thread.start()

    def call(self) -> int:
        return asyncio.run_coroutine_threadsafe(trivial(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@contextmanager
def as_worker_executes(task: celery.Task) -> Iterator[Callable[[], Any]]:
    """Yield a call of ``task``'s body as a worker's tracer makes it.

    The tracer pushes the message's request (``called_directly=False``) and calls
    ``task.run``; that request is what sends relier_bridge to the persistent bridge loop
    instead of a disposable one. The push happens once per batch, not per call: it is
    Celery's cost, the same for every task, and would blur the bridge's own.
    """
    task.push_request(id=str(uuid.uuid4()), task=task.name, args=(), kwargs={},
                      called_directly=False, is_eager=False, delivery_info={})
    try:
        yield task.run
    finally:
        task.pop_request()


def check_bridge_path() -> relier_bridge._LoopThread:
    """Prove that the timed calls take the bridge loop, not a disposable loop per call."""
    stale = relier_bridge._bridge_loop  # closed after each pass, so never healthy here
    if stale is not None and stale.healthy():
        raise RuntimeError("a bridge loop is running before the first bridged call")
    with as_worker_executes(bridged_trivial) as call:
        call()
    bridge = relier_bridge._bridge_loop
    if bridge is None or not bridge.healthy():
        raise RuntimeError("a bridged call made as a worker makes it created no bridge loop")
    with as_worker_executes(bridged_running_loop) as call:
        if call() is not bridge.loop:
            raise RuntimeError("a bridged coroutine did not run on relier_bridge._bridge_loop")
    return bridge


def us_per_call(call: Callable[[], object], calls: int) -> Callable[[], float]:
    """A contender that times ``calls`` calls of ``call``; returns microseconds per call."""

    def sample() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - started) / calls * 1e6

    return sample


def per_call_overhead(settings: Settings, cpu: Optional[int]) -> Samples:
    """Time every contender in this process; with ``cpu``, all their threads are pinned to it.

    Threads inherit the CPU affinity of the thread that starts them, so pinning this one
    before any contender exists pins them all. Pinned, a hand-off between two threads costs
    the same every time; free, it depends on whether the scheduler wakes the other thread
    on the same CPU or on an idle one (which, in a VM, may first have to wake its vCPU).
    """
    all_cpus = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        return time_contenders(settings)
    finally:
        os.sched_setaffinity(0, all_cpus)


def time_contenders(settings: Settings) -> Samples:
    bridge = check_bridge_path()
    ping_pong = LockPingPong()
    persistent_loop = PersistentLoop()
    asgiref_call = async_to_sync(trivial)  # wrapped once, as a decorator would
    calls = settings.calls_per_sample
    try:
        with anyio.from_thread.start_blocking_portal() as portal, \
                as_worker_executes(bridged_trivial) as bridge_call, \
                as_worker_executes(bridged_trivial_timed) as timed_bridge_call:
            samples = interleaved({
                PING_PONG: us_per_call(ping_pong.call, calls),
                BRIDGE: us_per_call(bridge_call, calls),
                BRIDGE_TIMED: us_per_call(timed_bridge_call, calls),
                "run_coroutine_threadsafe, loop thread": us_per_call(persistent_loop.call,
                                                                     calls),
                "asyncio.run per call": us_per_call(lambda: asyncio.run(trivial()), calls),
                "asgiref async_to_sync": us_per_call(asgiref_call, calls),
                "anyio blocking portal": us_per_call(lambda: portal.call(trivial), calls),
            }, settings.call_rounds)
    finally:
        persistent_loop.close()
        ping_pong.close()
    if relier_bridge._bridge_loop is not bridge:
        raise RuntimeError("the bridge loop was replaced during the benchmark")
    relier_bridge.close_bridge_loop()  # the next pass starts a bridge with its own affinity
    return samples


def per_call_report(samples: Samples, title: str, tag: str) -> tuple[Section, list[Target]]:
    section = Section(title, rows_from(samples, "us/call", PING_PONG, PER_CALL_NOTES),
                      "vs ping-pong")
    targets = [
        Target(f"bridge round trip / bare ping-pong ({tag})",
               paired_ratio(samples, BRIDGE, PING_PONG), 1.3, at_least=False),
        Target(f"timeouts armed / bridge ({tag})",
               paired_ratio(samples, BRIDGE_TIMED, BRIDGE), 1.10, at_least=False),
    ]
    return section, targets


# --- parts 2 to 4: real workers ----------------------------------------------------------

class Worker:
    """A ``celery worker`` subprocess that loads this module, in a session of its own."""

    def __init__(self, pool: str, concurrency: int, queue: str) -> None:
        self.name = f"{pool} -c {concurrency}"
        command = [sys.executable, "-m", "celery", "-A", MODULE, "worker", "-P", pool,
                   "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h",
                   "--without-gossip", "--without-mingle", "--without-heartbeat",
                   "--loglevel=INFO"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.output: deque[str] = deque(maxlen=200)  # its tail, for error messages
        self._ready = threading.Event()
        # A session of its own makes the worker and its pool children one process group,
        # which stop() can end as a unit if the worker ignores a warm shutdown.
        self.process = subprocess.Popen(command, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        # The pipe must be drained all along, or a chatty worker blocks on a full pipe.
        threading.Thread(target=self._read_output, name=f"bench-log-{queue}",
                         daemon=True).start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip()
            self.output.append(line)
            if line.endswith(" ready."):
                self._ready.set()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.output)
                raise RuntimeError(f"worker {self.name} did not get ready:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown: the worker stops its own pool
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # this worker's own group only
                self.process.wait(10)


def purge_queue(name: str) -> None:
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge(name)


@contextmanager
def running_workers(*specs: tuple[str, int, str]) -> Iterator[list[Worker]]:
    """Start one worker per (pool, concurrency, queue), wait until all are ready; stop all."""
    workers: list[Worker] = []
    try:
        for _pool, _concurrency, queue in specs:
            purge_queue(queue)
        for spec in specs:
            workers.append(Worker(*spec))
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def tasks_per_second(task: celery.Task, count: int, queue: str,
                     expected: object) -> Callable[[], float]:
    """A contender that sends ``count`` calls of ``task`` and waits for every result."""

    def sample() -> float:
        started = time.perf_counter()
        results = group(task.si() for _ in range(count)).apply_async(queue=queue)
        # interval: GroupResult.get first polls the stored results once and then naps for
        # `interval` (0.5 s by default) even if the last result is a millisecond away; that
        # nap would be a fixed cost in every round.
        values = results.get(timeout=max(120.0, count / 5), interval=0.005)
        elapsed = time.perf_counter() - started
        if any(value != expected for value in values):
            raise RuntimeError(f"{task.name} returned {set(values) - {expected}!r}")
        return count / elapsed

    return sample


def end_to_end(settings: Settings, parts: set[int]) -> tuple[list[Section], list[Target]]:
    """Parts 2 and 3, on one prefork worker."""
    sections: list[Section] = []
    targets: list[Target] = []
    n = settings.e2e_tasks
    with running_workers(("prefork", 2, E2E_QUEUE)):
        if 2 in parts:
            sync, bridged = "plain sync task", "async task via relier_bridge"
            samples = interleaved({
                sync: tasks_per_second(sync_trivial, n, E2E_QUEUE, 1),
                bridged: tasks_per_second(bridged_trivial, n, E2E_QUEUE, 1),
                "sync task, asyncio.run per task": tasks_per_second(asyncio_run_trivial, n,
                                                                    E2E_QUEUE, 1),
            }, settings.rounds)
            sections.append(Section(
                f"2. end to end, trivial task, worker prefork -c 2 ({n} tasks per round)",
                rows_from(samples, "tasks/s", sync), "vs sync"))
            targets.append(Target("end to end, async via bridge / plain sync",
                                  paired_ratio(samples, bridged, sync), 0.95, at_least=True))
        if 3 in parts:
            fresh, shared = "asyncio.run, new client per task", "bridge, one client per process"
            ceiling = "plain sync task, no I/O at all"
            samples = interleaved({
                fresh: tasks_per_second(asyncio_run_redis_get, n, E2E_QUEUE, REDIS_VALUE),
                shared: tasks_per_second(bridged_redis_get, n, E2E_QUEUE, REDIS_VALUE),
                ceiling: tasks_per_second(sync_trivial, n, E2E_QUEUE, 1),
            }, settings.rounds)
            sections.append(Section(
                f"3. client reuse, one redis GET per task, worker prefork -c 2 ({n} tasks "
                "per round)",
                rows_from(samples, "tasks/s", fresh,
                          {ceiling: "the most any task gets out of this setup"}),
                "vs new client"))
            targets.append(Target("client reuse / new client + asyncio.run",
                                  paired_ratio(samples, shared, fresh), 1.8, at_least=True))
    return sections, targets


def rss_kib(pid: object = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone meanwhile, or a zombie without memory


def process_tree_rss_kib(root: int) -> int:
    """Sum of the RSS of ``root`` and of all its descendants, read from /proc."""
    parent_of: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                    parent_of[int(entry.name)] = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
    tree, unvisited = {root}, [root]
    while unvisited:
        parent = unvisited.pop()
        children = [pid for pid, ppid in parent_of.items() if ppid == parent]
        tree.update(children)
        unvisited.extend(children)
    return sum(rss_kib(pid) for pid in tree)


class PeakMemorySampler:
    """Samples the RSS of each worker's process tree in the background; keeps the peaks."""

    def __init__(self, workers: list[Worker], interval: float = 0.05) -> None:
        self.peak_kib = {worker.name: 0 for worker in workers}
        self._workers, self._interval = workers, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            for worker in self._workers:
                rss = process_tree_rss_kib(worker.process.pid)
                self.peak_kib[worker.name] = max(self.peak_kib[worker.name], rss)

    def __enter__(self) -> PeakMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def io_concurrency(settings: Settings) -> tuple[Section, list[Target]]:
    """Part 4: the same I/O-bound task on a threads worker and on a prefork worker."""
    threads, prefork = "threads -c 50, one bridge loop", "prefork -c 2"
    with running_workers(("threads", 50, THREADS_QUEUE), ("prefork", 2, PREFORK_IO_QUEUE)) \
            as workers, PeakMemorySampler(workers) as memory:
        samples = interleaved({
            prefork: tasks_per_second(bridged_io_sleep, settings.io_tasks_prefork,
                                      PREFORK_IO_QUEUE, 1),
            threads: tasks_per_second(bridged_io_sleep, settings.io_tasks_threads,
                                      THREADS_QUEUE, 1),
        }, settings.rounds)
    rows = rows_from(samples, "tasks/s", prefork, {
        prefork: f"{settings.io_tasks_prefork} tasks per round",
        threads: f"{settings.io_tasks_threads} tasks per round",
    })
    for worker, label in zip(workers, (threads, prefork)):
        peak_mib = memory.peak_kib[worker.name] / 1024
        rows.append(Row(f"{label}: peak RSS", peak_mib, peak_mib, peak_mib, "MiB",
                        note="worker and pool children, summed"))
    section = Section(f"4. concurrency, `await asyncio.sleep({IO_SLEEP_S})` per task", rows,
                      "vs prefork")
    target = Target("threads -c 50 / prefork -c 2, I/O-bound",
                    paired_ratio(samples, threads, prefork), 10.0, at_least=True)
    return section, [target]


# --- part 5: memory of the bridge --------------------------------------------------------

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def probe_bridge_cost() -> None:
    """In a fresh process: print RSS, threads and fds before and after the bridge exists."""
    gc.collect()
    before = {"rss_kib": rss_kib(), "threads": threading.active_count(), "fds": open_fds()}
    with as_worker_executes(bridged_trivial) as call:
        call()  # creates the bridge loop and its thread, and runs one coroutine on it
    gc.collect()
    after = {"rss_kib": rss_kib(), "threads": threading.active_count(), "fds": open_fds()}
    print(json.dumps({"before": before, "after": after}))


def bridge_memory(settings: Settings) -> Section:
    baselines: list[float] = []
    deltas: list[float] = []
    threads: set[int] = set()
    fds: set[int] = set()
    for _ in range(settings.rss_probes):
        probe = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                "--probe-bridge-cost"],
                               cwd=HERE, capture_output=True, text=True, check=True)
        measured = json.loads(probe.stdout.strip().splitlines()[-1])
        before, after = measured["before"], measured["after"]
        baselines.append(before["rss_kib"] / 1024)
        deltas.append(float(after["rss_kib"] - before["rss_kib"]))
        threads.add(after["threads"] - before["threads"])
        fds.add(after["fds"] - before["fds"])
    rows = [
        Row("process with this module imported", *quartiles(baselines), "MiB"),
        Row("+ bridge thread and loop, after one call", *quartiles(deltas), "KiB",
            note=f"threads added: {sorted(threads)}, fds added: {sorted(fds)}"),
    ]
    return Section(f"5. memory of the bridge, per worker process ({settings.rss_probes} fresh "
                   "processes)", rows)


# --- main --------------------------------------------------------------------------------

def check_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).set(REDIS_KEY, REDIS_VALUE)
    except redis.RedisError as error:
        sys.exit(f"Redis at {REDIS_URL} is not usable ({error}); start one, or point "
                 "RELIER_BENCH_REDIS at one (parts 1 and 5 run without it: --parts 1,5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny N: a smoke run (< 1 min)")
    parser.add_argument("--parts", default="1,2,3,4,5",
                        help="comma-separated parts to run (default: all five)")
    parser.add_argument("--probe-bridge-cost", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_bridge_cost:
        probe_bridge_cost()
        return
    settings = QUICK if args.quick else FULL
    parts = {int(part) for part in args.parts.split(",") if part.strip().isdigit()}
    if not parts or not parts <= {1, 2, 3, 4, 5}:
        parser.error(f"--parts takes numbers from 1 to 5, got {args.parts!r}")
    if parts & {2, 3, 4}:
        check_redis()
    started = time.monotonic()
    print(f"relier_bridge benchmark, {'quick' if args.quick else 'full'} run: Python "
          f"{platform.python_version()}, celery {celery.__version__}, asgiref "
          f"{version('asgiref')}, anyio {version('anyio')}, redis-py {redis.__version__}, "
          f"{os.cpu_count()} CPUs, {REDIS_URL}")
    print(f"medians over {settings.call_rounds} (part 1) or {settings.rounds} (parts 2-4) "
          "interleaved rounds, after one warm-up round; ratio = median of the per-round "
          "ratios to the section's baseline", flush=True)
    sections: list[Section] = []
    targets: list[Target] = []
    if 1 in parts:
        cpu = max(os.sched_getaffinity(0))
        section, found = per_call_report(
            per_call_overhead(settings, cpu),
            f"1a. per-call overhead of `async def f(): return 1` called from sync code, in "
            f"one process, all threads pinned to CPU {cpu} ({settings.calls_per_sample} "
            "calls per sample)", "1a, pinned")
        sections.append(section)
        targets += found
        section, found = per_call_report(
            per_call_overhead(settings, None),
            "1b. the same, threads free to run on any CPU, as in a worker (often bimodal: a "
            "wake-up on the other CPU costs more than one on the same CPU; see p25..p75)",
            "1b, free")
        sections.append(section)
        targets += found
    if parts & {2, 3}:
        found_sections, found = end_to_end(settings, parts)
        sections += found_sections
        targets += found
    if 4 in parts:
        section, found = io_concurrency(settings)
        sections.append(section)
        targets += found
    if 5 in parts:
        sections.append(bridge_memory(settings))
    for section in sections:
        print_section(section)
    print_targets(targets)
    print(f"\ntotal time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
