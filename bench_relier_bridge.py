"""Benchmark relier_bridge against the other ways of running a coroutine from sync code.

Needs Linux (it reads /proc and pins threads to a CPU), the ``bench`` extra (asgiref,
anyio, redis, Django, psycopg, httpx), a Redis server at ``$RELIER_BENCH_REDIS`` (default
redis://127.0.0.1:6379/3; the run keeps its queues, results and one key in that database)
and, for part 7, PostgreSQL at ``$RELIER_BENCH_POSTGRES`` (default
postgresql://postgres@127.0.0.1:5432/test; the part makes and drops table relier_bench_row)::

    python bench_relier_bridge.py            # full run, about 6 to 7 minutes
    python bench_relier_bridge.py --quick    # smoke run with tiny N, under a minute
    python bench_relier_bridge.py --parts 1,6

The bridge is measured through its public behaviour only. Inside a worker, a call is made
the way the worker's tracer makes it: ``push_request(called_directly=False, ...)``, then
``task.run()``, then ``pop_request()``; a probe task reports the thread it ran on (the
bridge's is named ``relier-bridge-<pid>``), its request and a context variable.

Every comparison is measured side by side in the same run: each round runs every contender
once, in an order rotated from round to round, and the table shows each contender's median
over the rounds. A ratio is the median over rounds of (contender / baseline) within the
same round, so slow drifts in the machine's load cancel out. Targets are reported as
pass/miss with the spread of the per-round ratios; a miss never fails the run.

This file is also the Celery app that the benchmark's workers load (``celery -A
bench_relier_bridge``): the tasks are defined at import time, and ``main`` runs only when
the file is executed as a script.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import logging
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Optional, Union

import anyio
import anyio.from_thread
import celery
import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from celery import Celery, group

from relier_bridge import SoftContext, bridged_task, close_bridge_loop, per_loop

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
AGET_QUEUE = "relier_bench.aget"

app = Celery(MODULE, broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,  # the run reads every result within seconds; let Redis drop them
)
# Eager mode for part 1's eager calls: an app of its own, so the workers' app is untouched.
eager_app = Celery(f"{MODULE}_eager", set_as_current=False)
eager_app.conf.task_always_eager = True

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


probe_var: contextvars.ContextVar[str] = contextvars.ContextVar("bench_probe", default="")


@bridged_task(app=app, name="bench.bridged_probe", bind=True)
async def bridged_probe(self: celery.Task) -> tuple[str, int, Optional[str], str]:
    """Where and with what a bridged coroutine runs: thread name and id, request id, var."""
    thread = threading.current_thread()
    return thread.name, thread.ident or 0, self.request.id, probe_var.get()


@app.task(name="bench.sync_trivial")
def sync_trivial() -> int:
    return 1


@app.task(name="bench.asyncio_run_trivial")
def asyncio_run_trivial() -> int:
    return asyncio.run(trivial())


@bridged_task(app=eager_app, name="bench.eager_bridged_trivial")
async def eager_bridged_trivial() -> int:
    return 1


@eager_app.task(name="bench.eager_asyncio_run_trivial")
def eager_asyncio_run_trivial() -> int:
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


@bridged_task(app=app, name="bench.ends_at")
async def ends_at(pause: float) -> float:
    """Part 6: returns the wall-clock time at which it ends."""
    await asyncio.sleep(pause)
    return time.time()


# --- measuring and reporting -------------------------------------------------------------

@dataclass
class Settings:
    rounds: int  # interleaved rounds per comparison with workers (plus a warm-up round)
    e2e_rounds: int  # the same for part 2, whose target (0.97x) asks for a tighter median
    call_rounds: int  # the same for part 1, whose rounds take well under a second
    calls_per_sample: int  # part 1: calls timed together, to rise above timer resolution
    e2e_tasks: int  # parts 2 and 3: tasks per round
    io_tasks_threads: int  # part 4: tasks per round, sized so that a round lasts 1 to 3 s
    io_tasks_prefork: int
    rss_probes: int  # part 5: fresh processes measured
    waiters: int  # part 6: concurrent waits per round, on tasks ending within `wait_window`
    wait_window: float
    wait_rounds: int
    single_waits: int  # part 6, low load: waits per contender, one at a time
    django_tasks: int  # part 7: tasks per round on threads -c 8 (a third on prefork -c 2)


FULL = Settings(rounds=9, e2e_rounds=15, call_rounds=21, calls_per_sample=100, e2e_tasks=300,
                io_tasks_threads=500, io_tasks_prefork=50, rss_probes=5,
                waiters=1000, wait_window=5.0, wait_rounds=2, single_waits=40,
                django_tasks=150)
QUICK = Settings(rounds=3, e2e_rounds=3, call_rounds=3, calls_per_sample=50, e2e_tasks=100,
                 io_tasks_threads=200, io_tasks_prefork=20, rss_probes=2,
                 waiters=100, wait_window=1.0, wait_rounds=1, single_waits=6,
                 django_tasks=60)

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


def per_round_ratios(samples: Samples, name: str, baseline: str) -> list[float]:
    return [value / base for value, base in zip(samples[name], samples[baseline])]


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
    ratios: list[float]  # one per round, contender / baseline
    goal: float
    at_least: bool  # True: passes when the median ratio >= goal; False: when <= goal

    @property
    def measured(self) -> float:
        return statistics.median(self.ratios)

    @property
    def passed(self) -> bool:
        return self.measured >= self.goal if self.at_least else self.measured <= self.goal


def rows_from(samples: Samples, unit: str, baseline: str,
              notes: Optional[dict[str, str]] = None) -> list[Row]:
    return [Row(name, *quartiles(values), unit,
                statistics.median(per_round_ratios(samples, name, baseline)),
                (notes or {}).get(name, ""))
            for name, values in samples.items()]


def target(label: str, samples: Samples, name: str, baseline: str, goal: float,
           at_least: bool) -> Target:
    return Target(label, per_round_ratios(samples, name, baseline), goal, at_least)


def print_section(section: Section) -> None:
    print(f"\n{section.title}")
    if not section.rows:
        return
    print(f"  {'contender':<46} {'median':>9} {'unit':<8} {'p25..p75':>16} "
          f"{section.ratio_header:>13}  note")
    for row in section.rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        iqr = f"{row.p25:.1f}..{row.p75:.1f}" if row.p25 != row.p75 else ""
        print(f"  {row.label:<46} {row.median:>9.1f} {row.unit:<8} {iqr:>16} {ratio:>13}  "
              f"{row.note}".rstrip())


def print_targets(targets: list[Target]) -> None:
    print("\ntargets (median of the per-round ratios, with their p25..p75 and min..max; "
          "a miss does not fail the run)")
    print(f"  {'target':<56} {'measured':>9} {'goal':>8}  {'rounds p25..p75 (min..max)':<28}"
          " result")
    for tgt in targets:
        goal = f"{'>=' if tgt.at_least else '<='}{tgt.goal:.2f}x"
        _, p25, p75 = quartiles(tgt.ratios)
        spread = f"{p25:.3f}..{p75:.3f} ({min(tgt.ratios):.2f}..{max(tgt.ratios):.2f})"
        print(f"  {tgt.label:<56} {tgt.measured:>8.3f}x {goal:>8}  {spread:<28} "
              f"{'pass' if tgt.passed else 'MISS'}")


# --- part 1: per-call overhead in one process --------------------------------------------

class LoopThread:
    """A plain event loop run by a daemon thread: the floor of a hop, and a host for
    run_coroutine_threadsafe."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-loop",
                                        daemon=True)
        self._thread.start()

    def hop(self) -> int:
        """The floor: one callback onto the running loop, which releases a lock back."""
        done = threading.Lock()
        done.acquire()
        self.loop.call_soon_threadsafe(done.release)
        done.acquire()
        return 1

    def hop_task(self) -> int:
        """The floor plus what running a coroutine takes: a Task created on the loop (which
        first steps it on the loop's next turn before Python 3.12's eager tasks)."""
        done = threading.Lock()
        done.acquire()

        async def release() -> None:
            done.release()

        self.loop.call_soon_threadsafe(self.loop.create_task, release())
        done.acquire()
        return 1

    def run_coroutine(self) -> int:
        return asyncio.run_coroutine_threadsafe(trivial(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def push_worker_request(task: celery.Task, task_id: str = "bench-call") -> None:
    """Push a request as a worker's tracer does before it calls ``task.run``:
    ``called_directly=False`` is what sends relier_bridge to its bridge loop."""
    task.push_request(id=task_id, task=task.name, args=(), kwargs={}, called_directly=False,
                      is_eager=False, delivery_info={})


def as_tracer_calls(task: celery.Task, task_id: str = "bench-call") -> Callable[[], Any]:
    """A call of ``task`` as a worker's tracer makes it: push the request, call
    ``task.run``, pop the request."""

    def call() -> Any:
        push_worker_request(task, task_id)
        try:
            return task.run()
        finally:
            task.pop_request()

    return call


def probe_bridge() -> int:
    """Check, through a probe task, that a tracer-made call runs on the bridge thread with
    the request and the caller's context variables; return that thread's id."""
    token = probe_var.set("carried")
    try:
        name, ident, request_id, var = as_tracer_calls(bridged_probe, "probe-id")()
    finally:
        probe_var.reset(token)
    if not name.startswith("relier-bridge-") or (request_id, var) != ("probe-id", "carried"):
        raise RuntimeError(f"a tracer-made call ran on {name!r} with request id "
                           f"{request_id!r} and context variable {var!r}")
    return ident


def us_per_call(call: Callable[[], object], calls: int,
                under: Optional[celery.Task] = None) -> Callable[[], float]:
    """A contender that times ``calls`` calls of ``call``; returns microseconds per call.
    With ``under``, the calls run under one worker request of that task, pushed per sample."""

    def sample() -> float:
        if under is not None:
            push_worker_request(under)
        try:
            started = time.perf_counter()
            for _ in range(calls):
                call()
            return (time.perf_counter() - started) / calls * 1e6
        finally:
            if under is not None:
                under.pop_request()

    return sample


@contextmanager
def pinned(cpu: Optional[int]) -> Iterator[None]:
    """Pin this thread, and so every thread it starts, to ``cpu`` (None: leave it free).

    Pinned, a hand-off between two threads costs the same every time; free, it depends on
    whether the scheduler wakes the other thread on the same CPU or on an idle one (which,
    in a VM, may first have to wake its vCPU).
    """
    all_cpus = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, all_cpus)


HOP = "loop hop: call_soon_threadsafe + lock back"
BRIDGE = "relier_bridge, task.run()"
BRIDGE_TIMED = "relier_bridge, task.run(), timeouts armed"
PER_TASK = "relier_bridge, push_request + run + pop"
HOP_TASK = "  loop hop + a Task for the coroutine"


def in_worker_calls(settings: Settings, cpu: Optional[int]) -> tuple[Section, list[Target]]:
    """Part 1a/1b: the bridge's hop against the floor and the alternatives, in one process."""
    calls = settings.calls_per_sample
    with pinned(cpu):
        close_bridge_loop()  # the next call starts a bridge thread with this affinity
        bridge_thread = probe_bridge()
        loop_thread = LoopThread()
        try:
            with anyio.from_thread.start_blocking_portal() as portal:
                samples = interleaved({
                    HOP: us_per_call(loop_thread.hop, calls),
                    HOP_TASK: us_per_call(loop_thread.hop_task, calls),
                    BRIDGE: us_per_call(bridged_trivial.run, calls, under=bridged_trivial),
                    BRIDGE_TIMED: us_per_call(bridged_trivial_timed.run, calls,
                                              under=bridged_trivial_timed),
                    PER_TASK: us_per_call(as_tracer_calls(bridged_trivial), calls),
                    "run_coroutine_threadsafe, loop thread": us_per_call(
                        loop_thread.run_coroutine, calls),
                    "asyncio.run per call": us_per_call(lambda: asyncio.run(trivial()), calls),
                    "asgiref async_to_sync": us_per_call(async_to_sync(trivial), calls),
                    "anyio from_thread portal": us_per_call(lambda: portal.call(trivial),
                                                            calls),
                    "anyio.run per call": us_per_call(lambda: anyio.run(trivial), calls),
                }, settings.call_rounds)
        finally:
            loop_thread.close()
        if probe_bridge() != bridge_thread:
            raise RuntimeError("the bridge thread was replaced during the benchmark")
    where = f"all threads pinned to CPU {cpu}" if cpu is not None else "threads free"
    tag = "pinned" if cpu is not None else "free"
    rows = rows_from(samples, "us/call", HOP, {
        HOP: "the floor",
        HOP_TASK: "create_task on the loop, the Task releases the lock",
        BRIDGE: "under a worker request pushed once per sample",
        BRIDGE_TIMED: "soft 30 s, hard 60 s, on_soft hook",
        PER_TASK: "all a tracer does per task; Celery's request is the rest",
    })
    section = Section(f"1{'a' if cpu is not None else 'b'}. in a worker: per-call overhead of "
                      f"`async def f(): return 1` from sync code, one process, {where} "
                      f"({calls} calls per sample)", rows, "vs hop")
    return section, [
        target(f"in worker: bridge call / loop hop ({tag})", samples, BRIDGE, HOP, 1.5,
               at_least=False),
        target(f"in worker: timeouts armed / not armed ({tag})", samples, BRIDGE_TIMED,
               BRIDGE, 1.05, at_least=False),
    ]


def new_loop_close() -> None:
    asyncio.new_event_loop().close()


def without_asgiref(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` as in a process that never loaded asgiref (this one has, for async_to_sync)."""

    def hidden() -> Any:
        module = sys.modules.pop("asgiref.sync")
        try:
            return call()
        finally:
            sys.modules["asgiref.sync"] = module

    return hidden


def outside_worker_calls(settings: Settings) -> tuple[Section, list[Target]]:
    """Part 1c: direct and eager calls, each on a disposable loop, threads free."""
    # No hard_timeout: the caller drives the loop; unless asgiref is loaded, when it runs the
    # coroutine's thread-sensitive calls while a thread of the call's own drives the loop.
    for call, expected in ((without_asgiref(bridged_probe), threading.current_thread().name),
                           (bridged_probe, "relier-disposable-bench.bridged_probe")):
        name, *_ = call()
        if name != expected:
            raise RuntimeError(f"a direct call ran on {name!r}, not on {expected!r}")
    calls = max(10, settings.calls_per_sample // 4)
    direct_base, direct = "asyncio.run(f())", "bridged task(), direct call"
    direct_asgiref = "bridged task(), direct call, asgiref loaded"
    eager_base, eager = "eager: @app.task running asyncio.run", "eager: bridged task"
    eager_asgiref = "eager: bridged task, asgiref loaded"
    new_loop = "  new_event_loop() + close()"
    sync_call = "  sync @app.task, direct call"
    samples = interleaved({
        direct_base: us_per_call(lambda: asyncio.run(trivial()), calls),
        direct: us_per_call(without_asgiref(bridged_trivial), calls),
        direct_asgiref: us_per_call(bridged_trivial, calls),
        new_loop: us_per_call(new_loop_close, calls),
        sync_call: us_per_call(sync_trivial, calls),
        eager_base: us_per_call(lambda: eager_asyncio_run_trivial.delay().get(), calls),
        eager: us_per_call(without_asgiref(lambda: eager_bridged_trivial.delay().get()), calls),
        eager_asgiref: us_per_call(lambda: eager_bridged_trivial.delay().get(), calls),
    }, settings.call_rounds)
    rows = rows_from({name: samples[name] for name in list(samples)[:5]}, "us/call",
                     direct_base, {sync_call: "Celery's own share of task()",
                                   direct_asgiref: "a thread drives its loop (Django apps)"})
    rows += rows_from({name: samples[name] for name in (eager_base, eager, eager_asgiref)},
                      "us/call",
                      eager_base, {eager_base: "`.delay().get()`, task_always_eager; "
                                               "baseline of the row below"})
    section = Section(f"1c. outside a worker: direct and eager calls, a disposable loop each, "
                      f"threads free ({calls} calls per sample)", rows, "vs asyncio.run")
    return section, [
        target("direct: bridged task() / asyncio.run(f())", samples, direct, direct_base,
               1.1, at_least=False),
        target("eager: bridged / @app.task running asyncio.run", samples, eager, eager_base,
               1.1, at_least=False),
    ]


# --- parts 2, 3, 4 and 6: real workers ---------------------------------------------------

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


@contextmanager
def running_workers(*specs: tuple[str, int, str]) -> Iterator[list[Worker]]:
    """Start one worker per (pool, concurrency, queue), wait until all are ready; stop all."""
    workers: list[Worker] = []
    try:
        with app.connection_for_write() as connection:
            for _pool, _concurrency, queue in specs:
                connection.default_channel.queue_purge(queue)
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
            }, settings.e2e_rounds)
            sections.append(Section(
                f"2. end to end on Redis, trivial task, worker prefork -c 2 ({n} tasks per "
                f"round, {settings.e2e_rounds} rounds)", rows_from(samples, "tasks/s", sync),
                "vs sync"))
            targets.append(target("end to end: bridged async / plain sync", samples, bridged,
                                  sync, 0.97, at_least=True))
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
            targets.append(target("client reuse / new client + asyncio.run", samples, shared,
                                  fresh, 1.8, at_least=True))
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


def process_group_rss_kib(group_id: int) -> int:
    """Sum of the RSS of the processes in a process group (a worker and its pool)."""
    total = 0
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                if int(stat.read().rpartition(")")[2].split()[2]) == group_id:
                    total += rss_kib(entry.name)
        except (OSError, IndexError, ValueError):
            continue  # not a process, or it ended while we looked
    return total


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
                rss = process_group_rss_kib(worker.process.pid)
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
    return section, [target("threads -c 50 / prefork -c 2, I/O-bound", samples, threads,
                            prefork, 10.0, at_least=True)]


# --- part 5: memory of the bridge --------------------------------------------------------

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def probe_bridge_cost() -> None:
    """In a fresh process: print RSS, threads and fds before and after the bridge exists."""
    gc.collect()
    before = {"rss_kib": rss_kib(), "threads": threading.active_count(), "fds": open_fds()}
    probe_bridge()  # creates the bridge loop and its thread, and runs one coroutine on it
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


# --- part 6: many results awaited on one loop --------------------------------------------

def send_spread(count: int, window: float, lead: float) -> list[Any]:
    """Send ``count`` tasks that end at random times within ``window`` seconds from
    ``lead`` seconds from now: each is an ETA task (a timer in the worker, not a worker
    thread, holds it until then), with a 10 ms sleep as its work."""
    start = time.time() + lead
    return [ends_at.apply_async((0.01,), queue=AGET_QUEUE, eta=datetime.fromtimestamp(
        start + random.uniform(0, window), tz=timezone.utc)) for _ in range(count)]


async def wait_for_all(results: list[Any],
                       wait: Callable[[Any], Any]) -> list[tuple[float, float]]:
    """Wait for every result at once; (the task's end, when its wait returned) for each."""

    async def one(result: Any) -> tuple[float, float]:
        ended = await wait(result)
        return ended, time.time()

    return await asyncio.gather(*(one(result) for result in results))


def waiting_round(wait: Callable[[Any], Any], settings: Settings,
                  latencies: list[float], cpu: list[float], early: list[int]) -> None:
    # The lead lets every task be sent (1 to 3 ms each here) before the first one ends.
    results = send_spread(settings.waiters, settings.wait_window,
                          lead=0.5 + settings.waiters * 0.004)
    started, cpu_started = time.time(), time.process_time()
    ends = asyncio.run(wait_for_all(results, wait))
    cpu.append(time.process_time() - cpu_started)
    # A task that ended before the waits began (a slow send) is timed from their start.
    latencies += [returned - max(ended, started) for ended, returned in ends]
    early.append(sum(ended < started for ended, _ in ends))


def one_at_a_time(settings: Settings) -> Section:
    """Part 6, low load: one wait at a time, on a task that ends 50 to 500 ms after it
    starts; each contender in turn, rotated. The figure is from the task's end (its return
    value, the clock read as it returns) to the wait's return."""
    loop = asyncio.new_event_loop()  # one loop for all waits, as a service has
    contenders: dict[str, Callable[[Any], float]] = {
        "aget()": lambda result: loop.run_until_complete(result.aget(timeout=30)),
        "get() in a thread": lambda result: result.get(timeout=30),
        "to_thread(get)": lambda result: loop.run_until_complete(
            asyncio.to_thread(result.get, timeout=30)),
    }
    latencies: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, float] = dict.fromkeys(contenders, 0.0)
    waited: dict[str, float] = dict.fromkeys(contenders, 0.0)
    try:
        for round_no in range(settings.single_waits + 1):  # round 0 warms up
            names = list(contenders)
            for name in names[round_no % 3:] + names[:round_no % 3]:
                result = ends_at.apply_async((random.uniform(0.05, 0.5),), queue=AGET_QUEUE)
                started, cpu_started = time.time(), time.process_time()
                ended = contenders[name](result)
                returned = time.time()
                if round_no:
                    latencies[name].append(returned - ended)
                    cpu[name] += time.process_time() - cpu_started
                    waited[name] += returned - started
    finally:  # as asyncio.run ends: leftover tasks (aget's poller ends a turn later) first
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    rows = []
    for name, values in latencies.items():
        p99 = statistics.quantiles(values, n=100, method="inclusive")[98]
        rows.append(Row(f"{name}: task end -> wait returns", *(x * 1e3 for x in
                                                               quartiles(values)), "ms",
                        note=f"p99 {p99 * 1e3:.1f} ms; CPU {cpu[name] / waited[name]:.1%} "
                        "of the time waited"))
    return Section(f"6a. one result awaited at a time ({settings.single_waits} waits each), "
                   "Redis broker and backend, tasks ending 50-500 ms after the wait starts: "
                   "await result.aget() vs result.get() vs await asyncio.to_thread(result.get)",
                   rows)


def awaiting_results(settings: Settings) -> list[Section]:
    """Part 6: one wait at a time, then ``settings.waiters`` concurrent ``aget``s on one
    loop, against Redis."""
    if not hasattr(ends_at.AsyncResult("no-such-task"), "aget"):
        return [Section("6. skipped: relier_bridge has no aget yet", [])]
    contenders = {
        "aget()": lambda result: result.aget(timeout=120),
        "to_thread(get)": lambda result: asyncio.to_thread(result.get, timeout=120),
    }
    measured: dict[str, tuple[list[float], list[float], list[int]]] = {
        name: ([], [], []) for name in contenders}
    with running_workers(("threads", 8, AGET_QUEUE)):
        low_load = one_at_a_time(settings)
        for round_no in range(settings.wait_rounds):
            names = list(contenders)[round_no % 2:] + list(contenders)[:round_no % 2]
            for name in names:
                waiting_round(contenders[name], settings, *measured[name])
    rows = []
    for name, (latencies, cpu, early) in measured.items():
        p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
        rows.append(Row(f"{name}: task end -> wait returns",
                        *(x * 1e3 for x in quartiles(latencies)), "ms",
                        note=f"p99 {p99 * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms"
                        + (f"; {sum(early)} ended before the waits began" if sum(early) else "")))
        rows.append(Row(f"{name}: CPU of the waiting process",
                        *(x * 1e3 for x in quartiles(cpu)), "ms",
                        note="time.process_time() delta over a round's whole wait"))
    return [low_load, Section(
        f"6b. {settings.waiters} results awaited at once on one event loop, Redis "
        f"broker and backend; tasks end at random times within "
        f"{settings.wait_window:.0f} s (ETA tasks, worker threads -c 8); "
        f"{settings.wait_rounds} rounds, latencies pooled, await result.aget() vs "
        "await asyncio.to_thread(result.get)", rows)]


# --- part 7: Django, the async ORM and an HTTP call per task -----------------------------
# The realistic task: one 50 ms HTTP call (a per_loop httpx client against a local server),
# then the async ORM's acreate and aupdate; bridged, against the usual way, a sync task
# calling async_to_sync(body)() (a fresh loop per task, so a fresh client too). The workers
# get Celery's Django fixup (DJANGO_SETTINGS_MODULE names this module) and PostgreSQL.

DJANGO_URL = os.environ.get("RELIER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
# A worker per contender: a worker thread that served a bridged task's ORM call keeps
# asgiref's note of the bridge loop, where async_to_sync then runs its coroutines.
DJANGO_WORKERS = [(pool, concurrency, f"relier_bench.django_{pool}_{how}")
                  for pool, concurrency in (("prefork", 2), ("threads", 8))
                  for how in ("bridged", "async_to_sync")]
HTTP_DELAY_S = 0.05
BenchRow: Any = None  # the model, once Django is set up in this process


def django_setup() -> Any:
    """Django configured in code (CONN_MAX_AGE 0, Django's default), set up; the model."""
    global BenchRow
    if BenchRow is None:
        from urllib.parse import unquote, urlsplit

        import django
        from django.conf import settings
        from django.db import models

        url = urlsplit(DJANGO_URL)
        settings.configure(
            DATABASES={"default": {
                "ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
                "USER": unquote(url.username or ""), "PASSWORD": unquote(url.password or ""),
                "HOST": url.hostname or "127.0.0.1", "PORT": str(url.port or 5432)}},
            INSTALLED_APPS=[], LOGGING_CONFIG=None, USE_TZ=True, SECRET_KEY="bench",
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField")
        django.setup()

        class Row(models.Model):
            name = models.CharField(max_length=100)
            value = models.IntegerField(default=0)

            class Meta:
                app_label = MODULE
                db_table = "relier_bench_row"

        BenchRow = Row
    return BenchRow


def _make_bench_http_client() -> Any:
    import httpx

    return httpx.AsyncClient(base_url=os.environ["RELIER_BENCH_HTTP_URL"], trust_env=False)


bench_http = per_loop(_make_bench_http_client)


async def django_body() -> int:
    from django.db.models import F

    response = await (await bench_http()).get("/")
    row = await BenchRow.objects.acreate(name="bench", value=len(response.content))
    await BenchRow.objects.filter(pk=row.pk).aupdate(value=F("value") + 1)
    return 1


@bridged_task(app=app, name="bench.django_bridged")
async def django_bridged() -> int:
    return await django_body()


@app.task(name="bench.django_async_to_sync")
def django_async_to_sync() -> int:
    return async_to_sync(django_body)()


def start_slow_http_server() -> Any:
    """A keep-alive HTTP server on 127.0.0.1 that answers each request after 50 ms."""
    import http.server

    class SlowHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

        def do_GET(self) -> None:
            time.sleep(HTTP_DELAY_S)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def process_group_cpu_s(group_id: int) -> float:
    """User + system CPU seconds of the processes in a process group (a worker, its pool)."""
    total = 0
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
                if int(fields[2]) == group_id:
                    total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def django_tasks(settings: Settings) -> Section:
    row_model = django_setup()
    from django.db import connection

    with connection.schema_editor() as editor:
        editor.execute(f"DROP TABLE IF EXISTS {row_model._meta.db_table}")
        editor.create_model(row_model)
    connection.close()
    server = start_slow_http_server()
    os.environ.update(RELIER_BENCH_HTTP_URL=f"http://127.0.0.1:{server.server_port}",
                      DJANGO_SETTINGS_MODULE=MODULE, RELIER_BENCH_DJANGO="1")
    cpu: dict[str, list[float]] = {}
    try:
        with running_workers(*DJANGO_WORKERS) as workers:
            contenders: dict[str, Callable[[], float]] = {}
            for worker, (pool, _, queue) in zip(workers, DJANGO_WORKERS):
                how = "bridged" if queue.endswith("_bridged") else "async_to_sync"
                task = django_bridged if how == "bridged" else django_async_to_sync
                count = settings.django_tasks // (3 if pool == "prefork" else 1)
                name = f"{pool}: {how}"
                cpu[name] = []
                rate = tasks_per_second(task, count, queue, 1)

                def sample(rate: Callable[[], float] = rate, name: str = name,
                           group_id: int = worker.process.pid, count: int = count) -> float:
                    before = process_group_cpu_s(group_id)
                    value = rate()
                    cpu[name].append((process_group_cpu_s(group_id) - before) / count * 1000)
                    return value

                contenders[name] = sample
            samples = interleaved(contenders, settings.rounds)
    finally:
        for variable in ("RELIER_BENCH_HTTP_URL", "DJANGO_SETTINGS_MODULE", "RELIER_BENCH_DJANGO"):
            os.environ.pop(variable)
        server.shutdown()
        server.server_close()
        with connection.schema_editor() as editor:
            editor.delete_model(row_model)
        connection.close()
    rows: list[Row] = []
    for pool in ("prefork", "threads"):
        bridged, baseline = f"{pool}: bridged", f"{pool}: async_to_sync"
        for name in (baseline, bridged):
            rows.append(Row(name, *quartiles(samples[name]), "tasks/s",
                            statistics.median(per_round_ratios(samples, name, baseline)),
                            f"worker CPU {statistics.median(cpu[name][1:] or cpu[name]):.2f} "
                            "ms/task"))
    return Section(f"7. Django: a {HTTP_DELAY_S * 1000:.0f} ms HTTP call (per_loop httpx), "
                   f"acreate + aupdate per task ({settings.django_tasks // 3} tasks per round "
                   f"on prefork -c 2, {settings.django_tasks} on threads -c 8)", rows,
                   "vs a2s")


if os.environ.get("RELIER_BENCH_DJANGO") and os.environ.get("DJANGO_SETTINGS_MODULE") == MODULE:
    django_setup()  # a Django worker of part 7


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
    parser.add_argument("--parts", default="1,2,3,4,5,6,7",
                        help="comma-separated parts to run (default: all seven)")
    parser.add_argument("--probe-bridge-cost", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_bridge_cost:
        probe_bridge_cost()
        return
    settings = QUICK if args.quick else FULL
    parts = {int(part) for part in args.parts.split(",") if part.strip().isdigit()}
    if not parts or not parts <= {1, 2, 3, 4, 5, 6, 7}:
        parser.error(f"--parts takes numbers from 1 to 7, got {args.parts!r}")
    if parts & {2, 3, 4, 6, 7}:
        check_redis()
    started = time.monotonic()
    print(f"relier_bridge benchmark, {'quick' if args.quick else 'full'} run: Python "
          f"{platform.python_version()}, celery {celery.__version__}, asgiref "
          f"{version('asgiref')}, anyio {version('anyio')}, redis-py {redis.__version__}, "
          f"{os.cpu_count()} CPUs, {REDIS_URL}")
    print(f"medians over {settings.call_rounds} (part 1), {settings.e2e_rounds} (part 2) or "
          f"{settings.rounds} (parts 3, 4) "
          "interleaved rounds, after one warm-up round; ratio = median of the per-round "
          "ratios to the section's baseline", flush=True)
    sections: list[Section] = []
    targets: list[Target] = []
    if 1 in parts:
        for section, found in (in_worker_calls(settings, max(os.sched_getaffinity(0))),
                               in_worker_calls(settings, None),
                               outside_worker_calls(settings)):
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
    if 6 in parts:
        sections += awaiting_results(settings)
    if 7 in parts:
        sections.append(django_tasks(settings))
    for section in sections:
        print_section(section)
    if targets:
        print_targets(targets)
    print(f"\ntotal time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
