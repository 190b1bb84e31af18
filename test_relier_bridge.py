"""Tests for relier_bridge against real Celery workers.

This file is also the tasks module the workers load (``celery -A test_relier_bridge``)
and the demo (``python test_relier_bridge.py``). It needs only relier_bridge.py beside it.

Configuration, by environment variables alone:
  RELIER_BROKER_URL       broker to test against; default: an embedded, server-less broker
                          (kombu's file-system transport made atomic) in a fresh temp folder
  RELIER_RESULT_BACKEND   result backend; default: files in the same folder for the embedded
                          broker, the broker's own URL for redis://, else rpc://
  RELIER_REDIS_URL        a Redis server for the redis.asyncio drills when the broker is not
                          Redis (needs redis); default: the broker's URL if it is redis://
  RELIER_POSTGRES_URL     e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test, enables the
                          SQLAlchemy async drill (needs sqlalchemy[asyncio] and asyncpg); the
                          Django drills' database (needs django and psycopg), default: that
                          local URL, the drills skipping if no server answers there
  RELIER_QUICK=1          skips the long drills (fork churn, 2000-task leak check, warm
                          shutdown, 2000-task stress run): about 3.5 min instead of 8
  RELIER_CHURN_TASKS, RELIER_LEAK_TASKS, RELIER_STRESS_TASKS: sizes of those long drills

Every option the file needs is set here (a hang fails a test after 120 s: pytest-timeout),
so it runs the same beside relier_bridge.py alone as in its repository. At its end it
deletes what it made on a broker and a backend it does not own: the queues (and their
exchanges) it declared, the results of the tasks it and its workers sent, the redis
drill's keys.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Optional

import celery
import pytest
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.filesystem import FilesystemBackend
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from celery.signals import after_task_publish, task_prerun, worker_init
from kombu.exceptions import EncodeError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import ensure_bytes
from kombu.utils.json import dumps

import relier_bridge
from relier_bridge import BridgedResult, HardTimeout, SoftContext, bridged_task, per_loop

HERE = Path(__file__).resolve().parent
MODULE = "test_relier_bridge"  # the name workers import this file under
pytestmark = [  # a hang fails the test; slow tests set their own
    pytest.mark.timeout(120),
    # Celery's Redis result backend calls redis-py's deprecated setex: not ours to mend.
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]
# Inherited by the worker subprocesses, so that they and this process share one setup.
RUN_ID = os.environ.setdefault("RELIER_RUN_ID", uuid.uuid4().hex[:8])
DATA_DIR_OWNED = "RELIER_DATA_DIR" not in os.environ
DATA_DIR = Path(os.environ.setdefault("RELIER_DATA_DIR", tempfile.mkdtemp(prefix="relier-")))
BROKER_URL = os.environ.get("RELIER_BROKER_URL", "relierfs://")
EMBEDDED = BROKER_URL == "relierfs://"
QUEUES: set[str] = set()  # every queue this run declares on the broker, deleted at its end
# A skip, not a pytest marker: a test module cannot register a marker, and a vendored copy
# has no configuration file to do it.
long_drill = pytest.mark.skipif(os.environ.get("RELIER_QUICK", "") not in ("", "0"),
                                reason="a long drill: RELIER_QUICK is set; unset it to run this")


class AtomicFilesystemChannel(filesystem.Channel):  # type: ignore[misc]
    """kombu's file-system channel, except that a message file appears only when complete.

    The stock channel creates the file and then writes it, so a polling reader can read a
    half-written message, fail to decode it and kill the worker (kombu issue 1551).
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # No reader may match the staging name: kombu 5.3 takes any name containing the queue's.
        staging = os.path.join(self.data_folder_out, f".{uuid.uuid4()}.tmp")
        with open(staging, "wb") as message_file:
            message_file.write(ensure_bytes(dumps(payload)))
        os.replace(staging, final)


class AtomicFilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    Channel = AtomicFilesystemChannel


class AtomicFileBackend(FilesystemBackend):  # type: ignore[misc]
    """Celery's file result backend, writing each result by an atomic rename."""

    def set(self, key: bytes, value: Any) -> None:
        path = os.fsdecode(self._filename(key))
        staging = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(staging, "wb") as result_file:
            result_file.write(ensure_bytes(value))
        os.replace(staging, path)


TRANSPORT_ALIASES["relierfs"] = f"{MODULE}:AtomicFilesystemTransport"


def _result_backend() -> str:
    if "RELIER_RESULT_BACKEND" in os.environ:
        return os.environ["RELIER_RESULT_BACKEND"]
    if EMBEDDED:
        (DATA_DIR / "results").mkdir(exist_ok=True)
        return f"{MODULE}.AtomicFileBackend+file://{DATA_DIR / 'results'}"
    return BROKER_URL if BROKER_URL.startswith("redis") else "rpc://"


if EMBEDDED:
    for folder in ("queue", "processed", "control"):
        (DATA_DIR / folder).mkdir(exist_ok=True)

AUDITED: contextvars.ContextVar[str] = contextvars.ContextVar("audited")


class AuditTask(celery.Task):  # type: ignore[misc]
    """The app's own Task base, as teams write one for error reporting or sessions."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        AUDITED.set(f"before_start {self.name} {task_id}")


app = celery.Celery(MODULE, broker=BROKER_URL, backend=_result_backend(), task_cls=AuditTask)
app.conf.update(
    broker_transport_options={
        "data_folder_in": str(DATA_DIR / "queue"), "data_folder_out": str(DATA_DIR / "queue"),
        "processed_folder": str(DATA_DIR / "processed"),
        "control_folder": str(DATA_DIR / "control"), "polling_interval": 0.05,
    } if EMBEDDED else {},
    task_default_queue=f"relier-{RUN_ID}-prefork",  # push() goes to the prefork worker
    task_routes={f"{MODULE}.unconsumed": {"queue": f"relier-{RUN_ID}-nobody"}},
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
    task_inherit_parent_priority=True,
)
if os.environ.get("RELIER_VISIBILITY_TIMEOUT"):  # broker drills: Redis gives unacked work back
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options, "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "visibility_timeout": float(os.environ["RELIER_VISIBILITY_TIMEOUT"])}
if os.environ.get("RELIER_CANCEL_ON_CONNECTION_LOSS"):
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True


@after_task_publish.connect
def _remember_sent_task(headers: Optional[dict[str, Any]] = None, **_: Any) -> None:
    # Here and in the workers (tasks sent from coroutines, chains): the shared data folder
    # collects every id, so that the run can delete its results from the team's backend.
    if headers and "id" in headers:
        with open(DATA_DIR / f"sent-{os.getpid()}", "a") as sent:
            sent.write(headers["id"] + "\n")

# ---------------------------------------------------------------------------------------
# Tasks the workers run. Each reports what it saw, so the tests can judge from outside.
# ---------------------------------------------------------------------------------------
_loop_tokens: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, str] = (
    weakref.WeakKeyDictionary())
REQUEST_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag")
SOFT_CALLS: dict[str, int] = {}
KEPT_GENERATORS: list[Any] = []
CLOSED_GENERATORS: list[str] = []


def mark(name: str) -> None:
    """Leave evidence in the shared data folder (the tests read it from another process)."""
    (DATA_DIR / f"mark-{name}").write_text(repr(time.time()))


def marked(name: str) -> Optional[float]:
    path = DATA_DIR / f"mark-{name}"
    return float(path.read_text()) if path.exists() else None


@task_prerun.connect
def _tag_request(task_id: str, **_: Any) -> None:
    REQUEST_TAG.set(f"prerun-{task_id}")


@worker_init.connect
def _parent_runs_a_loop_before_forking(**_: Any) -> None:
    # Children forked from here inherit a running-looking loop whose thread they lack.
    if os.environ.get("RELIER_TEST_PARENT_LOOP"):
        parent_loop = asyncio.new_event_loop()
        asyncio.set_event_loop(parent_loop)
        parent_loop.run_until_complete(asyncio.sleep(0))
        relier_bridge._bridge()


def _facts() -> dict[str, Any]:
    token = _loop_tokens.setdefault(asyncio.get_running_loop(), uuid.uuid4().hex)
    thread = threading.current_thread()
    return {"pid": os.getpid(), "loop": token, "thread": thread.name, "daemon": thread.daemon,
            "owner_pid": int(thread.name.rsplit("-", 1)[-1]), "tag": REQUEST_TAG.get(None)}


@bridged_task(app=app)
async def loop_facts() -> dict[str, Any]:
    await asyncio.sleep(0)
    return _facts()


@bridged_task
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


@bridged_task(app=app)
def sync_facts() -> dict[str, Any]:
    return {"thread": threading.current_thread().name, "pid": os.getpid()}


@bridged_task(app=app)
async def unconsumed(x: Any) -> Any:
    return x


class EchoClient:
    """A pooled async client: one TCP connection, bound to the loop it was opened on."""

    instance: Optional[EchoClient] = None

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.uses = reader, writer, 0

    @classmethod
    async def get(cls) -> EchoClient:
        if cls.instance is None:
            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while line := await reader.readline():
                    writer.write(line)
                    await writer.drain()

            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            cls.instance = cls(*await asyncio.open_connection("127.0.0.1", port))
        return cls.instance

    async def echo(self, text: str) -> str:
        self.uses += 1
        self.writer.write(text.encode() + b"\n")
        await self.writer.drain()
        return (await asyncio.wait_for(self.reader.readline(), 10)).decode().strip()


@bridged_task(app=app)
async def use_client(text: str) -> dict[str, Any]:
    client = await EchoClient.get()
    return {"echo": await client.echo(text), "uses": client.uses, "pid": os.getpid(),
            "client": id(client)}


@bridged_task(app=app)
async def call_directly_inside() -> str:
    try:
        add(1, 2)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


@bridged_task(app=app, bind=True)
async def whoami(self: celery.Task) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"id": self.request.id, "retries": self.request.retries,
            "called_directly": self.request.called_directly,
            "hostname": self.request.hostname, "tag": REQUEST_TAG.get(None)}


@bridged_task(app=app, bind=True, max_retries=3)
async def retry_twice(self: celery.Task) -> int:
    if self.request.retries < 2:
        raise self.retry(countdown=0.1)
    return int(self.request.retries)


@bridged_task(app=app, bind=True, autoretry_for=(OSError,), retry_kwargs={"countdown": 0.1},
              max_retries=3)
async def autoretry_twice(self: celery.Task) -> int:
    if self.request.retries < 2:
        raise OSError("not yet")
    return int(self.request.retries)


async def record_soft(ctx: SoftContext) -> None:
    assert ctx.task_id is not None
    SOFT_CALLS[ctx.task_id] = SOFT_CALLS.get(ctx.task_id, 0) + 1
    ctx.set_partial({"done": 3, "task_id": ctx.task_id, "args": list(ctx.args)})


def failing_hook(ctx: SoftContext) -> None:
    raise ValueError(f"hook of {ctx.task_id} failed on purpose")


@bridged_task(app=app, bind=True, soft_timeout=0.3, hard_timeout=60, on_soft=record_soft)
async def soft_then_finish(self: celery.Task, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return SOFT_CALLS.get(self.request.id, 0)


@bridged_task(app=app, soft_timeout=0.2, hard_timeout=60, on_soft=failing_hook)
async def soft_hook_fails(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


@bridged_task(app=app, soft_timeout=0.2)
async def soft_without_hook(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


@bridged_task(app=app, bind=True, soft_timeout=0.2, hard_timeout=0.8, on_soft=record_soft)
async def hard_cancelled(self: celery.Task, n: int) -> None:
    try:
        await asyncio.sleep(60)
    finally:
        mark(f"finally-{self.request.id}")


@bridged_task(app=app)
async def sleeper(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


# ---------------------------------------------------------------------------------------
# Workers: real `celery worker` subprocesses, started lean, always stopped by pid.
# ---------------------------------------------------------------------------------------
class Worker:
    """A `celery worker` subprocess consuming its own queue, with its log kept in memory."""

    def __init__(self, name: str, pool: str, concurrency: int, *extra: str,
                 env: Optional[dict[str, str]] = None) -> None:
        self.name, self.queue = name, f"relier-{RUN_ID}-{name}"
        QUEUES.add(self.queue)
        command = [sys.executable, "-m", "celery", "-A", MODULE, "worker", "-P", pool,
                   "-c", str(concurrency), "-Q", self.queue, "-n", f"{name}-{RUN_ID}@%h",
                   "--without-gossip", "--without-mingle", "--without-heartbeat",
                   "-l", "INFO", *extra]
        environment = {**os.environ, "PYTHONPATH": str(HERE), "PYTHONUNBUFFERED": "1",
                       **(env or {})}
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.process = subprocess.Popen(
            command, cwd=HERE, env=environment, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own process group: stop() reaches the children
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.wait_for(" ready.", timeout=60)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def log(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float, start: int = 0) -> str:
        """Wait until a log line from index ``start`` on contains ``text``; return it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[start:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"worker {self.name}: no {text!r} in its log:\n{tail}")
                self.changed.wait(min(left, 0.5))

    def send(self, task: Any, *args: Any, **options: Any) -> AsyncResult:
        return task.apply_async(args, queue=self.queue, **options)

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM); SIGKILL the whole group if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the group id is the worker's pid
        return self.process.wait(10)


def get(result: AsyncResult, timeout: float = 30) -> Any:
    """``result.get`` that polls the embedded backend often (it polls every 0.5 s by default)."""
    return result.get(timeout=timeout, interval=0.05)


@contextlib.contextmanager
def running_worker(name: str, pool: str, concurrency: int, *extra: str,
                   env: Optional[dict[str, str]] = None) -> Iterator[Worker]:
    worker = Worker(name, pool, concurrency, *extra, env=env)
    try:
        yield worker
    finally:
        worker.stop()


def delete_queues() -> None:
    """Delete the queues and exchanges this run declared on a broker it does not own (the
    embedded one goes with its folder): else each would stay, a durable queue and exchange
    on RabbitMQ, a `_kombu.binding.<queue>` key on Redis."""
    if EMBEDDED:
        return
    QUEUES.update((app.conf.task_default_queue, f"relier-{RUN_ID}-nobody"))
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in sorted(QUEUES):
            queue = app.amqp.queues[name](channel)  # as the worker declared it
            queue.declare()  # kombu's Redis channel deletes only bindings it has declared
            queue.delete()
            queue.exchange.delete()


def delete_results() -> None:
    """Delete the results of every task this run sent from a key-value backend it does not
    own (files beside the embedded broker go with their folder; rpc:// keeps none)."""
    if isinstance(app.backend, BaseKeyValueStoreBackend) and not (
            EMBEDDED and "RELIER_RESULT_BACKEND" not in os.environ):
        for sent in DATA_DIR.glob("sent-*"):
            for task_id in sent.read_text().split():
                app.backend.forget(task_id)
    if REDIS_URL:
        import redis

        with redis.Redis.from_url(REDIS_URL) as client:
            for key in client.scan_iter(f"relier-{RUN_ID}-*"):  # redis_round_trip's
                client.delete(key)


@pytest.fixture(scope="session", autouse=True)
def _data_dir() -> Iterator[None]:
    yield
    relier_bridge.close_bridge_loop()
    # After every worker has stopped: the session fixtures set up after this one end first.
    delete_queues()
    delete_results()
    if DATA_DIR_OWNED:
        shutil.rmtree(DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def prefork() -> Iterator[Worker]:
    # Named so that push() reaches it: task_default_queue is this worker's queue.
    with running_worker("prefork", "prefork", 2,
                        env={"RELIER_TEST_PARENT_LOOP": "1"}) as worker:
        yield worker


@pytest.fixture(scope="session")
def solo() -> Iterator[Worker]:
    with running_worker("solo", "solo", 1) as worker:
        yield worker


@pytest.fixture(scope="session")
def threads() -> Iterator[Worker]:
    with running_worker("threads", "threads", 4) as worker:
        yield worker


# ---------------------------------------------------------------------------------------
# 1-2. One persistent bridge loop per worker process, for every pool; clients reused.
# ---------------------------------------------------------------------------------------
def _check_one_loop_per_process(facts: list[dict[str, Any]]) -> dict[int, str]:
    loops: dict[int, str] = {}
    for fact in facts:
        assert fact["owner_pid"] == fact["pid"], "the loop must be created in its own process"
        assert fact["daemon"] and fact["thread"].startswith("relier-bridge-")
        assert loops.setdefault(fact["pid"], fact["loop"]) == fact["loop"]
    return loops


@pytest.mark.timeout(120)
def test_prefork_children_each_run_one_persistent_loop(prefork: Worker) -> None:
    results = [prefork.send(loop_facts) for _ in range(40)]
    facts = [get(result) for result in results]
    loops = _check_one_loop_per_process(facts)
    assert len(set(loops.values())) == len(loops)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_solo_and_threads_pools_share_one_loop(pool: str, request: Any) -> None:
    worker: Worker = request.getfixturevalue(pool)
    facts = [get(result) for result in [worker.send(loop_facts) for _ in range(20)]]
    assert len(_check_one_loop_per_process(facts)) == 1


@long_drill
@pytest.mark.timeout(240)
def test_replacement_children_create_their_own_loop() -> None:
    count = int(os.environ.get("RELIER_CHURN_TASKS", "200"))
    with running_worker("churn", "prefork", 2, "--max-tasks-per-child=1",
                        env={"RELIER_TEST_PARENT_LOOP": "1"}) as worker:
        results = [worker.send(loop_facts) for _ in range(count)]
        facts = [get(result, timeout=180) for result in results]
    loops = _check_one_loop_per_process(facts)
    assert len(loops) >= count // 2, "every task should run in a fresh child"
    assert len(set(loops.values())) == len(loops)


def test_async_client_is_reused_across_tasks(prefork: Worker) -> None:
    replies = [get(result) for result in [prefork.send(use_client, f"m{i}") for i in range(30)]]
    assert [reply["echo"] for reply in replies] == [f"m{i}" for i in range(30)]
    uses: dict[int, list[int]] = {}
    for reply in replies:
        uses.setdefault(reply["pid"], []).append(reply["uses"])
    assert sum(max(counts) for counts in uses.values()) == 30, "one client per process"


# ---------------------------------------------------------------------------------------
# 3. push refuses inside a running loop; apush sends off the loop; no deadlocks.
# ---------------------------------------------------------------------------------------
def test_push_inside_a_running_loop_names_apush() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"await task\.apush"):
            add.push(1, 2)

    asyncio.run(main())


def test_direct_call_inside_a_running_loop_raises_instead_of_hanging() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="would block the event loop"):
            add(1, 2)

    asyncio.run(main())


def test_direct_call_on_the_bridge_thread_raises(prefork: Worker) -> None:
    assert "apush" in get(prefork.send(call_directly_inside))


def test_apush_sends_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    sent_from: list[int] = []

    def slow_send(*args: Any, **kwargs: Any) -> str:
        sent_from.append(threading.get_ident())
        time.sleep(0.3)
        return "sent"

    monkeypatch.setattr(add, "apply_async", slow_send)

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        assert await add.apush(1, 2) == "sent"
        ticker.cancel()
        return ticks

    ticks = asyncio.run(main())
    assert sent_from and sent_from[0] != threading.get_ident()
    assert ticks >= 5, "the loop kept turning during the send"


def _task_stack_entries() -> int:
    """Entries on Celery's task stacks, one per thread that ever pushed and did not pop (a
    thread's stack outlives it: it is kept by thread id)."""
    storage = celery._state._task_stack._local.__storage__
    return sum(len(values.get("stack", ())) for values in list(storage.values()))


def test_apush_leaves_celerys_task_stack_as_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(add, "apply_async", lambda *_: "sent")  # (an eager one pops it all)

    async def main() -> None:  # a fresh loop, and so fresh relier-io threads, each time
        assert await add.apush(1, 2) == "sent"

    asyncio.run(main())
    before = _task_stack_entries()
    for _ in range(100):
        asyncio.run(main())
    assert _task_stack_entries() == before


def test_push_and_apush_reach_a_worker(prefork: Worker) -> None:
    assert get(add.push(2, 3)) == 5

    async def main() -> Any:
        return await add.apush(4, 5)

    assert get(asyncio.run(main())) == 9


# ---------------------------------------------------------------------------------------
# 4. Outside a worker: a disposable loop per call, closed completely.
# ---------------------------------------------------------------------------------------
@bridged_task(app=app)
async def leaves_things_open(tag: str) -> asyncio.AbstractEventLoop:
    async def numbers() -> Any:
        try:
            yield 1
            yield 2
        finally:
            CLOSED_GENERATORS.append(tag)

    generator = numbers()
    KEPT_GENERATORS.append(generator)  # only the loop's shutdown can close it now
    await generator.__anext__()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, time.sleep, 0.01)  # starts the default executor
    return loop


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_direct_call_uses_a_disposable_loop_closed_completely() -> None:
    relier_bridge.close_bridge_loop()
    add(0, 0)  # warm up imports and lazy globals
    gc.collect()  # earlier tests' sockets must not be collected inside the window below
    threads_before, fds_before = set(threading.enumerate()), _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loops = [leaves_things_open(f"call-{i}") for i in range(10)]
        gc.collect()
    assert len({id(loop) for loop in loops}) == 10, "a fresh loop for every call"
    assert all(loop.is_closed() for loop in loops)
    assert CLOSED_GENERATORS[-10:] == [f"call-{i}" for i in range(10)]
    assert not set(threading.enumerate()) - threads_before, "no thread left behind"
    assert _open_fds() <= fds_before, "no file descriptor leaked"
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks
    policy = asyncio.get_event_loop_policy()
    assert getattr(policy._local, "_loop", None) is None, "no loop left set on the thread"
    bridge = relier_bridge._bridge_loop
    assert bridge is None or bridge.state is not relier_bridge._LoopState.OPEN


# ---------------------------------------------------------------------------------------
# 5. Cooperative soft and hard timeouts.
# ---------------------------------------------------------------------------------------
def test_soft_timeout_calls_the_hook_once_and_the_task_goes_on(prefork: Worker) -> None:
    assert get(prefork.send(soft_then_finish, 1.2)) == 1


def test_a_failing_soft_hook_is_logged_and_the_task_goes_on(prefork: Worker) -> None:
    start = len(prefork.lines)
    result = prefork.send(soft_hook_fails, 0.8)
    assert get(result) == "finished"
    prefork.wait_for(f"hook of {result.id} failed on purpose", timeout=10, start=start)


def test_soft_timeout_without_a_hook_is_logged(prefork: Worker) -> None:
    start = len(prefork.lines)
    assert get(prefork.send(soft_without_hook, 0.6)) == "finished"
    prefork.wait_for("soft_without_hook passed soft_timeout=0.2s", timeout=10, start=start)
    assert "Traceback" not in "\n".join(prefork.lines[start:])


def test_hard_timeout_cancels_and_reports_partial(prefork: Worker) -> None:
    result = prefork.send(hard_cancelled, 7)
    with pytest.raises(HardTimeout) as caught:
        get(result)
    error = caught.value
    assert isinstance(error, TimeLimitExceeded)
    assert "hard_cancelled" in str(error) and "0.8" in str(error)
    assert error.partial == {"done": 3, "task_id": result.id, "args": [7]}
    assert marked(f"finally-{result.id}") is not None, "finally ran before the task failed"


def test_a_long_task_without_timeouts_is_not_abandoned(prefork: Worker) -> None:
    assert get(prefork.send(sleeper, 2.5)) == 2.5


@bridged_task(app=app, bind=True, soft_time_limit=1)
async def over_celery_soft_limit(self: celery.Task) -> None:
    try:
        await asyncio.sleep(8)
    finally:
        mark(f"finally-{self.request.id}")


def test_celery_soft_time_limit_cancels_the_coroutine(prefork: Worker) -> None:
    start = time.time()
    result = prefork.send(over_celery_soft_limit)
    with pytest.raises(SoftTimeLimitExceeded):
        get(result)
    deadline = time.monotonic() + 5
    while marked(f"finally-{result.id}") is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the finally runs on the bridge loop, just after the failure
    finished = marked(f"finally-{result.id}")
    assert finished is not None and finished - start < 4, "the coroutine was not cancelled"


# ---------------------------------------------------------------------------------------
# 6. Validation at decoration time.
# ---------------------------------------------------------------------------------------
async def _body() -> None: ...


def _sync_body() -> None: ...


@pytest.mark.parametrize("options, error, text", [
    ({"soft_timeout": 1}, ValueError, "cannot be cancelled"),
    ({"hard_timeout": 1}, ValueError, "cannot be cancelled"),
])
def test_timeouts_on_sync_tasks_are_refused(options: dict[str, Any], error: type,
                                            text: str) -> None:
    with pytest.raises(error, match=text):
        bridged_task(app=app, **options)(_sync_body)


@pytest.mark.parametrize("options, text", [
    ({"soft_timeout": 2, "hard_timeout": 2}, "less than"),
    ({"soft_timeout": 3, "hard_timeout": 2}, "less than"),
    ({"hard_timeout": 0}, "positive"),
    ({"soft_timeout": -1}, "positive"),
    ({"hard_timeout": "5"}, "positive"),
    # Not finite, or past what a lock can wait: every call would fail (nan, an overflow).
    ({"hard_timeout": float("nan")}, "finite"),
    ({"hard_timeout": float("inf")}, "finite"),
    ({"hard_timeout": 1e308}, "finite"),
    ({"soft_timeout": float("nan")}, "finite"),  # it would fire on_soft at once
    ({"on_soft": record_soft}, "set soft_timeout"),
])
def test_bad_timeouts_are_refused(options: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        bridged_task(app=app, **options)(_body)


def test_bad_bodies_are_refused() -> None:
    async def agen() -> Any:
        yield 1

    def gen() -> Any:
        yield 1

    for body in (42, agen, gen):
        with pytest.raises(TypeError):
            bridged_task(app=app)(body)
    with pytest.raises(TypeError, match="on_soft"):
        bridged_task(app=app, soft_timeout=1, on_soft=5)(_body)


# ---------------------------------------------------------------------------------------
# 7. Sync tasks under the same decorator, without thread hops.
# ---------------------------------------------------------------------------------------
def test_sync_task_runs_on_the_worker_thread(prefork: Worker) -> None:
    facts = get(sync_facts.push())
    assert facts["thread"] == "MainThread"

    async def main() -> Any:
        return await sync_facts.apush()

    assert get(asyncio.run(main()))["thread"] == "MainThread"


# ---------------------------------------------------------------------------------------
# 8. bind=True, retry, autoretry_for, request and contextvars carried over.
# ---------------------------------------------------------------------------------------
def test_bound_task_sees_its_real_request(prefork: Worker) -> None:
    result = prefork.send(whoami)
    seen = get(result)
    assert seen["id"] == result.id and seen["called_directly"] is False
    assert seen["hostname"].startswith(f"prefork-{RUN_ID}@")
    assert seen["tag"] == f"prerun-{result.id}", "contextvars from the worker thread"


def test_retry_and_autoretry_work(prefork: Worker) -> None:
    assert get(prefork.send(retry_twice)) == 2
    assert get(prefork.send(autoretry_twice)) == 2


def test_contextvars_reach_the_coroutine(prefork: Worker) -> None:
    result = prefork.send(loop_facts)
    assert get(result)["tag"] == f"prerun-{result.id}"


# ---------------------------------------------------------------------------------------
# 9. Eager mode.
# ---------------------------------------------------------------------------------------
def test_eager_mode_from_sync_and_async_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    assert add.push(2, 3).get() == 5
    assert whoami.push().get()["called_directly"] is False

    async def main() -> Any:
        return (await add.apush(3, 4)).get()

    assert asyncio.run(main()) == 7


# ---------------------------------------------------------------------------------------
# 10. The waiting thread sleeps; it never spins on the future.
# ---------------------------------------------------------------------------------------
def test_waiting_for_a_coroutine_costs_no_cpu() -> None:
    sleeper.push_request(called_directly=False, id="no-spin", task=sleeper.name)
    try:
        cpu_before = time.thread_time()
        assert sleeper.run(0.5) == 0.5
        cpu_spent = time.thread_time() - cpu_before
    finally:
        sleeper.pop_request()
    assert relier_bridge._bridge_loop is not None, "ran on the bridge loop"
    assert cpu_spent < 0.1, f"the waiting thread used {cpu_spent:.3f} s of CPU"


def test_solo_task_wakes_the_hub_so_its_ack_is_not_held() -> None:
    # Solo pool, as Celery runs it: the task runs inside a callback of kombu's hub, on the
    # hub's thread, with its ack already queued by hub.call_soon(). kombu runs callbacks
    # queued from its own thread only after the next poll, which sleeps up to 10 s while a
    # timer is scheduled: a broker honouring prefetch (AMQP) sends the next task after it.
    import kombu
    from kombu.asynchronous import Hub, get_event_loop, set_event_loop
    from kombu.asynchronous.timer import Timer

    if kombu.VERSION < (5, 7):
        pytest.skip("kombu < 5.7: its hub cannot be woken from another thread at all; "
                    "kombu >= 5.7 runs this")
    previous = get_event_loop()
    hub = Hub(Timer(max_interval=10.0))  # as a worker's hub
    set_event_loop(hub)
    broker, sender = socket.socketpair()  # an idle broker connection
    acked: list[float] = []

    def ack() -> None:
        acked.append(time.monotonic())
        sender.send(b"next task")  # the broker's answer to an ack: the next delivery

    def solo_task() -> None:
        hub.call_soon(ack)  # Celery's early ack, queued before the task runs
        sleeper.push_request(called_directly=False, id="solo-hub", task=sleeper.name)
        try:
            assert sleeper.run(0) == 0
        finally:
            sleeper.pop_request()

    try:
        relier_bridge._note_hub()  # what worker_ready does in a worker
        hub.add_reader(broker, broker.recv, 64)
        hub.call_later(60, lambda: None)  # the AMQP heartbeat's timer: polls last 10 s
        hub.call_soon(solo_task)
        loop, start = hub.create_loop(), time.monotonic()
        next(loop)  # runs the task, then polls
        next(loop)  # runs what the task queued, then reads the "delivery"
        assert acked and acked[0] - start < 2, "the ack waited for the hub's poll timeout"
    finally:
        relier_bridge._hub_owner = None
        hub.close()
        set_event_loop(previous)
        broker.close()
        sender.close()


# ---------------------------------------------------------------------------------------
# Dispatch errors surface at the call site and nothing half-sent is left behind.
# ---------------------------------------------------------------------------------------
def test_unserialisable_arguments_fail_at_the_call_site() -> None:
    with pytest.raises(EncodeError):
        unconsumed.push(object())

    async def main() -> None:
        with pytest.raises(EncodeError):
            await unconsumed.apush(object())

    asyncio.run(main())
    unconsumed.push("good")
    queue = app.conf.task_routes[unconsumed.name]["queue"]
    with app.connection_for_read() as connection:
        inbox = connection.SimpleQueue(queue)
        try:
            message = inbox.get(timeout=10)
            message.ack()
            assert message.payload[0] == ["good"]
            with pytest.raises(inbox.Empty):
                inbox.get(timeout=1)
        finally:
            inbox.close()


# ---------------------------------------------------------------------------------------
# Fault drills: hostile tasks, signals and dying processes.
# ---------------------------------------------------------------------------------------
log = logging.getLogger(MODULE)
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns the log
BACKGROUND: list[Any] = []


@bridged_task(app=app, hard_timeout=1)
async def swallows_cancel() -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await asyncio.sleep(6)  # hostile: ignores the cancellation and keeps going


@bridged_task(app=app, hard_timeout=1)
async def blocks_the_loop() -> None:
    time.sleep(6)  # noqa: ASYNC251 - hostile on purpose: never yields to the loop


@bridged_task(app=app)
async def raises_base_exception(kind: str) -> None:
    await asyncio.sleep(0)
    raise {"exit": SystemExit, "interrupt": KeyboardInterrupt}[kind](f"{kind} from a coroutine")


@bridged_task(app=app)
async def stops_its_loop() -> str:
    asyncio.get_running_loop().stop()
    await asyncio.sleep(0.05)
    return "still here"


@bridged_task(app=app, bind=True, time_limit=2)
async def over_celery_hard_limit(self: celery.Task) -> None:
    log.warning("doomed %s in pid %d", self.request.id, os.getpid())
    await asyncio.sleep(30)


@bridged_task(app=app, bind=True, acks_late=True, reject_on_worker_lost=True)
async def survives_a_lost_child(self: celery.Task, key: str) -> int:
    if marked(f"lost-{key}") is None:
        mark(f"lost-{key}")
        log.warning("doomed %s in pid %d", key, os.getpid())
        await asyncio.sleep(60)
    return os.getpid()


@bridged_task(app=app, bind=True)
async def leaves_background_work(self: celery.Task, seconds: float) -> str:
    task_id = self.request.id  # the loop's shutdown runs outside this task's context

    async def background() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            mark(f"background-cancelled-{task_id}")

    async def numbers() -> Any:
        try:
            yield 1
            yield 2
        finally:
            mark(f"generator-closed-{task_id}")

    BACKGROUND.append(asyncio.ensure_future(background()))
    generator = numbers()
    KEPT_GENERATORS.append(generator)
    await generator.__anext__()
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0)
    log.warning("started %s", task_id)
    await asyncio.sleep(seconds)
    return "done"


@bridged_task(app=app)
async def probe() -> dict[str, int]:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    return {"pending": len(others), "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd"))}


def test_drill_swallowed_cancel_fails_on_time_and_frees_the_process(solo: Worker) -> None:
    loop_before = get(solo.send(loop_facts))["loop"]
    start, mark_line = time.monotonic(), len(solo.lines)
    with pytest.raises(HardTimeout):
        get(solo.send(swallows_cancel))
    assert time.monotonic() - start < 1 + relier_bridge.CANCEL_GRACE + 2.5
    solo.wait_for("ignored cancellation", timeout=5, start=mark_line)
    start = time.monotonic()
    assert get(solo.send(loop_facts))["loop"] == loop_before, "a turning loop is kept"
    assert time.monotonic() - start < 2.5, "the next task ran on time"


def test_drill_blocked_loop_is_replaced(solo: Worker) -> None:
    loop_before = get(solo.send(loop_facts))["loop"]
    start, mark_line = time.monotonic(), len(solo.lines)
    with pytest.raises(HardTimeout):
        get(solo.send(blocks_the_loop))
    assert time.monotonic() - start < 1 + relier_bridge.CANCEL_GRACE + 2.5
    solo.wait_for("blocked its event loop", timeout=5, start=mark_line)
    assert get(solo.send(loop_facts))["loop"] != loop_before
    assert time.monotonic() - start < 5.5, "the next task did not wait behind the stuck loop"


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_drill_base_exception_never_kills_the_bridge(threads: Worker, kind: str) -> None:
    loop_before = get(threads.send(loop_facts))["loop"]
    result = threads.send(raises_base_exception, kind)
    with pytest.raises(RuntimeError, match=f"{kind} from a coroutine"):
        get(result)
    assert get(threads.send(loop_facts))["loop"] == loop_before


def test_drill_a_stopped_loop_keeps_serving(solo: Worker) -> None:
    loop_before = get(solo.send(loop_facts))["loop"]
    assert get(solo.send(stops_its_loop)) == "still here"
    assert get(solo.send(loop_facts))["loop"] == loop_before


def test_drill_dead_bridge_thread_is_replaced() -> None:
    first = relier_bridge._bridge()
    assert first.thread is not None
    first.state = relier_bridge._LoopState.RETIRED
    first.loop.call_soon_threadsafe(first.loop.stop)
    first.thread.join(10)
    first.state = relier_bridge._LoopState.OPEN  # now only the dead thread gives it away
    assert not first.thread.is_alive()
    sleeper.push_request(called_directly=False, id="after-death", task=sleeper.name)
    try:
        assert sleeper.run(0.01) == 0.01
    finally:
        sleeper.pop_request()
    assert relier_bridge._bridge_loop is not first


def test_drill_celery_time_limit_kill_gives_a_fresh_loop(prefork: Worker) -> None:
    start = len(prefork.lines)
    result = prefork.send(over_celery_hard_limit)
    killed = int(prefork.wait_for(f"doomed {result.id} in pid", 30, start).split()[-1])
    with pytest.raises(TimeLimitExceeded):
        get(result)
    facts = [get(r) for r in [prefork.send(loop_facts) for _ in range(10)]]
    assert killed not in {fact["pid"] for fact in facts}
    _check_one_loop_per_process(facts)


@long_drill
def test_drill_warm_shutdown_finishes_the_task_then_closes_the_loop() -> None:
    worker = Worker("shutdown", "prefork", 1)
    try:
        result = worker.send(leaves_background_work, 2.0)
        worker.wait_for(f"started {result.id}", timeout=30)
        stop_started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
        assert time.monotonic() - stop_started < 15
    finally:
        worker.stop()
    assert get(result) == "done"
    assert marked(f"background-cancelled-{result.id}") is not None
    assert marked(f"generator-closed-{result.id}") is not None
    for bad in ("Task was destroyed but it is pending", "Event loop is closed", "Traceback"):
        assert bad not in worker.log


def test_drill_lost_child_is_redelivered(prefork: Worker) -> None:
    key, start = uuid.uuid4().hex, len(prefork.lines)
    result = prefork.send(survives_a_lost_child, key)
    doomed = int(prefork.wait_for(f"doomed {key} in pid", 30, start).split()[-1])
    os.kill(doomed, signal.SIGKILL)
    assert get(result, timeout=60) != doomed


@long_drill
@pytest.mark.timeout(300)
def test_drill_no_leaks_after_2000_tasks() -> None:
    count = int(os.environ.get("RELIER_LEAK_TASKS", "2000"))
    # A deep prefetch: with one message at a time the embedded broker polls between tasks.
    with running_worker("leak", "prefork", 1, "--prefetch-multiplier=100") as worker:
        before = get(worker.send(probe))
        results = [worker.send(add, i, i) for i in range(count)]
        assert [get(result, timeout=240) for result in results] == [2 * i for i in range(count)]
        after = get(worker.send(probe))
    assert after["pending"] == 0
    assert abs(after["threads"] - before["threads"]) <= 1
    assert abs(after["fds"] - before["fds"]) <= 1


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_drill_green_thread_pools_are_refused(pool: str) -> None:
    if importlib.util.find_spec(pool) is None:  # the worker imports it, not this process
        pytest.skip(f"{pool} is not installed: pip install {pool} to run this")
    with running_worker(pool, pool, 10) as worker:
        result = worker.send(add, 1, 2)
        with pytest.raises(RuntimeError, match="real threads"):
            get(result)
        assert get(worker.send(sync_facts))["pid"] == worker.process.pid


# ---------------------------------------------------------------------------------------
# Broker and backend faults: the broker or the result backend goes away mid-run. A bridged
# async task and the same plain sync task run side by side in one worker, under one fault;
# each body run is counted (start and end) in the data folder, by task key.
# ---------------------------------------------------------------------------------------
REDIS_SERVER = shutil.which("redis-server")
_sync_http_clients: dict[str, Any] = {}


def _sync_http_client() -> Any:
    """The plain task's counterpart of per_loop: one keep-alive client per worker thread."""
    import httpx

    holder = f"{os.getpid()}-{threading.current_thread().name}"
    if holder not in _sync_http_clients:
        _sync_http_clients[holder] = httpx.Client(
            base_url=os.environ["RELIER_CLIENTS_HTTP_URL"], trust_env=False,
            limits=httpx.Limits(keepalive_expiry=60))
    return _sync_http_clients[holder]


@bridged_task(app=app, acks_late=True)
async def fault_bridged(key: str, seconds: float) -> dict[str, Any]:
    count_run(f"start-{key}")
    client = await http_client()  # a per_loop client, kept across faults
    (await client.get("/")).raise_for_status()
    await asyncio.sleep(seconds)
    count_run(f"end-{key}")
    holder = _loop_tokens.setdefault(asyncio.get_running_loop(), uuid.uuid4().hex)
    return {"pid": os.getpid(), "holder": holder, "client": id(client), "at": time.time()}


@app.task(acks_late=True)
def fault_plain(key: str, seconds: float) -> dict[str, Any]:
    count_run(f"start-{key}")
    client = _sync_http_client()
    client.get("/").raise_for_status()
    time.sleep(seconds)
    count_run(f"end-{key}")
    return {"pid": os.getpid(), "holder": f"{os.getpid()}-{threading.current_thread().name}",
            "client": id(client), "at": time.time()}


def note(key: str, event: str) -> None:
    """Append one timed event of a task body's run to its journal in the data folder."""
    with (DATA_DIR / f"journal-{key}").open("a") as journal:  # O_APPEND: one whole line
        journal.write(f"{event} {time.time():.3f} {os.getpid()}\n")


def journal(key: str) -> list[tuple[str, float, int]]:
    path = DATA_DIR / f"journal-{key}"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(event, float(at), int(pid)) for event, at, pid in map(str.split, lines)]


@bridged_task(app=app, acks_late=True)
async def long_bridged(key: str, seconds: float) -> str:
    note(key, "start")
    try:
        for _ in range(round(seconds / 0.1)):
            await asyncio.sleep(0.1)
        note(key, "end")
    except BaseException as exc:
        note(key, f"raised-{type(exc).__name__}")
        raise
    finally:
        note(key, "finally")
        await asyncio.sleep(0.3)  # cleanup that awaits: closing a connection, say
        note(key, "cleaned")
    return key


@app.task(acks_late=True)
def long_plain(key: str, seconds: float) -> str:
    note(key, "start")
    try:
        for _ in range(round(seconds / 0.1)):
            time.sleep(0.1)
        note(key, "end")
    except BaseException as exc:
        note(key, f"raised-{type(exc).__name__}")
        raise
    finally:
        note(key, "finally")
        time.sleep(0.3)  # cleanup that waits: closing a connection, say
        note(key, "cleaned")
    return key


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of the drill's own, on a free port; killed by pid and restarted on the
    same port. ``persist``: every write reaches the disk first, so a SIGKILL loses nothing."""

    def __init__(self, folder: Path, persist: bool) -> None:
        assert REDIS_SERVER is not None
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                        "--dir", str(folder), "--save", "", "--appendfsync", "always",
                        "--appendonly", "yes" if persist else "no",
                        "--logfile", str(folder / "redis.log")]
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        _poll(self.answers, 20, f"private redis-server on port {self.port} answers")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """Start private redis-servers; each is killed by pid when the test ends."""
    if REDIS_SERVER is None:
        pytest.skip("needs redis-server on PATH (Debian: apt-get install redis-server): the "
                    "drill starts, kills and restarts a private one on a free port")
    if importlib.util.find_spec("redis") is None:  # the workers import it, not this process
        pytest.skip("needs redis (pip install redis, or the drills extra): kombu's Redis "
                    "transport, for the private redis-server the drill starts")
    servers: list[PrivateRedis] = []

    def start(name: str, persist: bool = False) -> PrivateRedis:
        servers.append(PrivateRedis(tmp_path / name, persist))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.kill()


@contextlib.contextmanager
def _producer(broker: str, backend: str) -> Iterator[celery.Celery]:
    """The test's own app on a drill's private broker and backend: tasks go by name."""
    producer = celery.Celery(f"{MODULE}-producer", broker=broker, backend=backend,
                             set_as_current=False)
    producer.conf.broker_connection_retry_on_startup = True
    try:
        yield producer
    finally:
        producer.close()


class Flow:
    """Tasks sent side by side, bridged and plain alternately, each under its own key."""

    def __init__(self, producer: celery.Celery, queue: str, per_kind: int,
                 tasks: tuple[Any, Any] = (fault_bridged, fault_plain),
                 seconds: float = 0.05) -> None:
        self.drill = uuid.uuid4().hex[:12]
        self.sent: list[tuple[str, str, AsyncResult]] = []
        for i in range(per_kind):
            for kind, task in zip(("bridged", "plain"), tasks):
                key = f"{self.drill}-{kind}-{i}"
                self.sent.append((kind, key, producer.send_task(
                    task.name, (key, seconds), queue=queue)))

    def count(self, what: str) -> int:
        return sum(1 for _ in DATA_DIR.glob(f"runs-{what}-{self.drill}-*"))

    def figures(self) -> dict[str, dict[str, int]]:
        figures: dict[str, dict[str, int]] = {}
        for kind, key, _ in self.sent:
            starts, ends = runs_of(f"start-{key}"), runs_of(f"end-{key}")
            row = figures.setdefault(kind, dict.fromkeys(
                ("sent", "completed", "redelivered", "duplicated", "lost"), 0))
            row["sent"] += 1
            row["completed"] += ends > 0
            row["redelivered"] += starts > 1  # its body started again
            row["duplicated"] += ends > 1  # its body ran to its end more than once
            row["lost"] += ends == 0
        return figures

    def results(self, kind: str, timeout: float = 30) -> list[Any]:
        return [get(result, timeout) for k, _, result in self.sent if k == kind]


def _report(title: str, figures: dict[str, dict[str, int]]) -> str:
    text = f"{title}: " + "; ".join(
        f"{kind} " + ", ".join(f"{name} {value}" for name, value in row.items())
        for kind, row in figures.items())
    print(text)
    return text


def _check_served_on(results: list[dict[str, Any]], after: float, one_per_pid: bool) -> None:
    """Each holder (a bridge loop; a plain worker thread) kept its one HTTP client the whole
    run through, and served after ``after``; ``one_per_pid``: one loop per process."""
    holders: dict[int, set[str]] = {}
    connections: dict[str, set[int]] = {}
    for result in results:
        connections.setdefault(result["holder"], set()).add(result["client"])
        holders.setdefault(result["pid"], set()).add(result["holder"])
    assert any(result["at"] > after for result in results), "nothing served after the fault"
    assert all(len(numbers) == 1 for numbers in connections.values()), connections
    if one_per_pid:
        assert all(len(loops) == 1 for loops in holders.values()), holders


POOLS = [("prefork", 2), ("threads", 4)]
VISIBILITY = 5  # seconds before Redis gives an unacked message back; the drills wait it out


def _fault_env(broker: str, backend: str, server: Any, **extra: str) -> dict[str, str]:
    return {"RELIER_BROKER_URL": broker, "RELIER_RESULT_BACKEND": backend,
            "RELIER_CLIENTS_HTTP_URL": f"http://127.0.0.1:{server.server_port}",
            "RELIER_VISIBILITY_TIMEOUT": str(VISIBILITY), **extra}


def _file_backend(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"{MODULE}.AtomicFileBackend+file://{folder}"


def _run_through_restart(flow: Flow, worker: Worker, restart: Any, stack: contextlib.ExitStack,
                         pool: str, concurrency: int, env: dict[str, str]) -> tuple[float, bool]:
    """Wait for a quarter of the tasks, ``restart()`` the broker, wait for the rest. A worker
    that consumes nothing for 20 s after the restart (kombu's Redis consumer can miss the
    loss) is replaced, as an operator would: returns the restart time and whether it was."""
    _poll(lambda: flow.count("end") >= len(flow.sent) // 4, 60, "a quarter of the tasks done")
    restart()
    restarted, replaced = time.time(), False
    done = flow.count("end")
    deadline = time.monotonic() + 20
    while flow.count("end") < len(flow.sent):
        if flow.count("end") > done:
            done, deadline = flow.count("end"), time.monotonic() + 20
        elif time.monotonic() > deadline and not replaced:
            log.warning("%s stalled after the restart; replacing it", worker.name)
            worker.stop()
            stack.enter_context(running_worker(f"{worker.name}-again", pool, concurrency,
                                               "-Q", worker.queue, env=env))
            replaced, deadline = True, time.monotonic() + 60
        elif time.monotonic() > deadline:
            raise AssertionError(f"tasks lost: {flow.figures()}")
        time.sleep(0.2)
    time.sleep(VISIBILITY + 3)  # what the broker still holds unacked comes back meanwhile
    return restarted, replaced


def _redis_restart(server: PrivateRedis) -> Any:
    def restart() -> None:
        server.kill()
        time.sleep(2)
        server.start()
    return restart


def _check_flow(title: str, flow: Flow, in_flight: int, restarted: float,
                replaced: bool) -> dict[str, dict[str, int]]:
    figures = flow.figures()
    _report(f"{title}, {in_flight} in flight at the fault, worker replaced: {replaced}", figures)
    for kind in ("bridged", "plain"):
        assert figures[kind]["lost"] == 0, figures
        # Only work in flight (started or prefetched) at the fault may run again.
        assert figures[kind]["redelivered"] <= in_flight + 4, figures
        assert figures[kind]["duplicated"] <= in_flight + 4, figures
    bridged, plain = flow.results("bridged"), flow.results("plain")
    _check_served_on(bridged, restarted, one_per_pid=True)
    _check_served_on(plain, restarted, one_per_pid=False)
    return figures


@long_drill
@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool, concurrency", POOLS)
def test_fault_broker_restart_loses_nothing(pool: str, concurrency: int, private_redis: Any,
                                            counting_http_server: Any, tmp_path: Path) -> None:
    """A private Redis broker is SIGKILLed while 200 tasks flow, and restarted 2 s later."""
    pytest.importorskip("httpx")
    if BROKER_URL.startswith("amqp"):
        pytest.skip("the RabbitMQ run does the RabbitMQ drill; this one runs in the others")
    broker = private_redis("broker", persist=True)
    backend = _file_backend(tmp_path / "results")
    env = _fault_env(broker.url, backend, counting_http_server)
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(running_worker(f"broker-{pool}", pool, concurrency, env=env))
        producer = stack.enter_context(_producer(broker.url, backend))
        flow = Flow(producer, worker.queue, 100)
        restarted, replaced = _run_through_restart(
            flow, worker, _redis_restart(broker), stack, pool, concurrency, env)
        _check_flow(f"Redis broker restart, {pool}", flow, concurrency, restarted, replaced)


@long_drill
@pytest.mark.timeout(150)
@pytest.mark.parametrize("pool, concurrency", [("prefork", 2)])  # threads: see README
def test_fault_result_backend_down_while_tasks_finish(
        pool: str, concurrency: int, private_redis: Any, counting_http_server: Any) -> None:
    """The private Redis result backend is SIGKILLed for 3 s while tasks finish; get() and
    aget() wait meanwhile in the test process."""
    pytest.importorskip("httpx")
    if BROKER_URL.startswith("amqp"):
        pytest.skip("the RabbitMQ run does the RabbitMQ drill; this one runs in the others")
    broker = private_redis("broker")
    backend = private_redis("backend", persist=True)
    env = _fault_env(broker.url, backend.url, counting_http_server)
    waited: dict[str, Any] = {}
    with running_worker(f"backend-{pool}", pool, concurrency, env=env) as worker, \
            _producer(broker.url, backend.url) as producer:
        flow = Flow(producer, worker.queue, 30, seconds=0.2)
        bridged_ids = [result.id for kind, _, result in flow.sent if kind == "bridged"]

        def wait_with_get() -> None:
            try:
                waited["get"] = [get(result, 20) for _, _, result in flow.sent]
            except Exception as exc:
                waited["get"] = exc

        async def wait_with_aget() -> Any:
            results = [BridgedResult(task_id, app=producer) for task_id in bridged_ids]
            return await asyncio.gather(*(r.aget(20, interval=0.05) for r in results),
                                        return_exceptions=True)

        getter = threading.Thread(target=wait_with_get, daemon=True)
        getter.start()
        agetter = threading.Thread(
            target=lambda: waited.setdefault("aget", asyncio.run(wait_with_aget())),
            daemon=True)
        agetter.start()
        _poll(lambda: flow.count("end") >= len(flow.sent) // 4, 60, "a quarter of the tasks done")
        _redis_restart(backend)()
        back = time.time()
        _poll(lambda: flow.count("end") == len(flow.sent), 60, "every task ends",
              lambda: f"{flow.figures()}; log:\n" + "\n".join(worker.lines[-40:]))
        getter.join(40)
        agetter.join(40)
        assert not getter.is_alive() and not agetter.is_alive(), "a waiter hangs"
        time.sleep(VISIBILITY + 3)
        states: dict[str, dict[str, int]] = {"bridged": {}, "plain": {}}
        served = []
        for kind, _, result in flow.sent:
            state = producer.AsyncResult(result.id).state
            states[kind][state] = states[kind].get(state, 0) + 1
            if kind == "bridged" and state == "SUCCESS":
                served.append(get(result))
        figures = flow.figures()
        after = [get(producer.send_task(fault_bridged.name, (f"{flow.drill}-after-{i}", 0),
                                        queue=worker.queue), 30) for i in range(4)]
    aget_errors = [type(v).__name__ for v in waited["aget"] if isinstance(v, BaseException)]
    _report(f"result backend down 3 s, {pool}; stored states {states}; get() waiter: "
            f"{type(waited['get']).__name__}; aget() errors: {len(aget_errors)} "
            f"{sorted(set(aget_errors))}", figures)
    # Celery's own outcome (stored after retry, failed, or never stored), alike for both.
    assert set(states["bridged"]) <= {"SUCCESS", "FAILURE", "PENDING"}, states
    assert abs(states["bridged"].get("SUCCESS", 0) - states["plain"].get("SUCCESS", 0)) <= 4
    assert states["bridged"].get("SUCCESS", 0) >= 30 // 2, states
    for kind in ("bridged", "plain"):
        assert figures[kind]["lost"] == 0 and figures[kind]["duplicated"] == 0, figures
    # aget() rides the outage out as get() does: only a result never stored times it out.
    assert aget_errors == ["TimeoutError"] * states["bridged"].get("PENDING", 0), aget_errors
    _check_served_on(served + after, back, one_per_pid=True)


RABBITMQCTL = shutil.which("rabbitmqctl")


def _rabbitmqctl(*args: str) -> str:
    assert RABBITMQCTL is not None
    return subprocess.run([RABBITMQCTL, "-q", *args], capture_output=True, text=True,
                          timeout=60, check=True).stdout


@pytest.fixture
def private_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of the drill's own, deleted after it: its connections alone are hit."""
    if not BROKER_URL.startswith("amqp") or RABBITMQCTL is None:
        pytest.skip("runs when RELIER_BROKER_URL=amqp://... names a RabbitMQ on this machine "
                    "that rabbitmqctl manages (CI's RabbitMQ run): it drops its own connections")
    vhost = f"relier-{RUN_ID}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def _drop_connections(vhost: str) -> Any:
    def drop() -> None:
        for line in _rabbitmqctl("list_connections", "pid", "vhost").splitlines():
            pid, _, name = line.partition("\t")
            if name.strip() == vhost:
                _rabbitmqctl("close_connection", pid.strip(), "relier_bridge fault drill")
    return drop


@long_drill
@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool, concurrency", POOLS)
def test_fault_rabbitmq_connections_dropped_lose_nothing(
        pool: str, concurrency: int, private_vhost: str, counting_http_server: Any,
        tmp_path: Path) -> None:
    """Every connection to the drill's vhost is closed by RabbitMQ while 200 tasks flow."""
    pytest.importorskip("httpx")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{private_vhost}"
    backend = _file_backend(tmp_path / "results")
    env = _fault_env(broker, backend, counting_http_server)
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(running_worker(f"amqp-{pool}", pool, concurrency, env=env))
        producer = stack.enter_context(_producer(broker, backend))
        flow = Flow(producer, worker.queue, 100)
        restarted, replaced = _run_through_restart(
            flow, worker, _drop_connections(private_vhost), stack, pool, concurrency, env)
        _check_flow(f"RabbitMQ connections dropped, {pool}", flow, concurrency, restarted,
                    replaced)


CANCEL_RUN = 8.0  # seconds each long task runs, in 0.1 s steps
CANCEL_VISIBILITY = 14  # above a whole run: Redis gives back only what a fault left unacked
CANCEL_LOG = re.compile(  # the worker's lines the drill reports
    "Connection to broker lost|cannot be acknowledged after a connection loss|Failed to cancel|"
    "NotImplementedError|WorkerLostError|exited prematurely|[Ss]ignal 15|Couldn't ack|"
    "succeeded in|[Rr]estoring|raised unexpected")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _runs(key: str, since: float) -> list[dict[str, Any]]:
    """Each run of a long task's body: its pid, and when (seconds after ``since``) it
    started, reached its end, raised (and what), entered its ``finally``, and ended its
    cleanup there; None for what it did not do."""
    runs: list[dict[str, Any]] = []
    for event, at, pid in journal(key):
        if event == "start":
            runs.append({"pid": pid, "start": round(at - since, 1), "end": None,
                         "raised": None, "finally": None, "cleaned": None})
        elif event.startswith("raised-"):
            runs[-1]["raised"] = (event.partition("-")[2], round(at - since, 1))
        else:
            runs[-1][event] = round(at - since, 1)
    return runs


def _fate(runs: list[dict[str, Any]], states: list[str], task_id: str,
          lines: list[str]) -> dict[str, Any]:
    """What happened to a task, in the terms a bridged and a plain task share."""
    first = runs[0]
    return {"cancel tried": any("cannot be acknowledged" in line and task_id in line
                                for line in lines),
            "cancel failed": any("Failed to cancel" in line and task_id in line
                                 for line in lines),
            "first run finished": first["end"] is not None,
            "first run raised": first["raised"] is not None,
            "first run's finally ran": first["finally"] is not None,
            "first run's finally cleaned up": first["cleaned"] is not None,
            "runs": len(runs), "later runs finished": all(r["cleaned"] for r in runs[1:]),
            "states": states}


@long_drill
@pytest.mark.timeout(150)
# -c 3 for two tasks: a slot stays free, so the worker polls the broker and sees the loss
# at once (with every slot busy it did not see it: README).
@pytest.mark.parametrize("pool, concurrency", [("prefork", 3), ("threads", 3)])
def test_fault_broker_lost_cancels_in_flight_as_celery_does(
        pool: str, concurrency: int, private_redis: Any, tmp_path: Path) -> None:
    """``worker_cancel_long_running_tasks_on_connection_loss=True``: the private Redis broker
    is SIGKILLed while a long bridged and a long plain ``acks_late`` task run side by side,
    and restarted 2 s after the worker logs the loss. Whatever Celery does to the plain
    task's run (terminates it, or fails to), it does to the bridged task's coroutine."""
    if BROKER_URL.startswith("amqp"):
        pytest.skip("a Redis broker drill: it runs in the non-AMQP suite runs")
    broker = private_redis("broker", persist=True)
    backend = _file_backend(tmp_path / "results")
    env = {"RELIER_BROKER_URL": broker.url, "RELIER_RESULT_BACKEND": backend,
           "RELIER_VISIBILITY_TIMEOUT": str(CANCEL_VISIBILITY),
           "RELIER_CANCEL_ON_CONNECTION_LOSS": "1"}
    drill = uuid.uuid4().hex[:12]
    keys = {"bridged": f"{drill}-bridged", "plain": f"{drill}-plain"}
    states: dict[str, list[str]] = {"bridged": [], "plain": []}
    watching = threading.Event()
    with running_worker(f"cancel-{pool}", pool, concurrency, env=env) as worker, \
            _producer(broker.url, backend) as producer:
        sent = {kind: producer.send_task(task.name, (keys[kind], CANCEL_RUN), queue=worker.queue)
                for kind, task in (("bridged", long_bridged), ("plain", long_plain))}

        def watch_states() -> None:  # every state the backend holds, in order
            while True:
                last = watching.is_set()  # one more look once told to stop
                for kind, result in sent.items():
                    state = producer.AsyncResult(result.id).state
                    if not states[kind] or states[kind][-1] != state:
                        states[kind].append(state)
                if last:
                    return
                watching.wait(0.05)

        watcher = threading.Thread(target=watch_states, daemon=True)
        watcher.start()
        _poll(lambda: all(journal(key) for key in keys.values()), 60, "both long tasks start")
        first_start = min(journal(key)[0][1] for key in keys.values())
        start = len(worker.lines)
        broker.kill()
        killed = time.time()
        worker.wait_for("Connection to broker lost", 15, start)
        time.sleep(2)
        broker.start()

        def settled() -> bool:  # every run over, and a redelivery has had its time to come
            runs = [run for key in keys.values() for run in _runs(key, killed)]
            return time.time() > first_start + CANCEL_VISIBILITY + 4 and all(
                run["cleaned"] is not None or not _alive(run["pid"]) for run in runs)

        _poll(settled, 90, "every run ends", lambda: {
            kind: _runs(key, killed) for kind, key in keys.items()})
        finals = {kind: get(result, 30) for kind, result in sent.items()}
        watching.set()
        watcher.join(10)
        stopped = worker.stop()  # a warm shutdown: nothing hangs
    lines = worker.lines[start:]
    runs = {kind: _runs(key, killed) for kind, key in keys.items()}
    fates = {kind: _fate(runs[kind], states[kind], sent[kind].id, lines) for kind in keys}
    print(f"\nbroker lost, cancel on connection loss, {pool} -c {concurrency}; worker exit "
          f"code {stopped}; task ids {({kind: r.id for kind, r in sent.items()})}")
    for kind in keys:
        print(f"  {kind}: runs {runs[kind]}; fate {fates[kind]}")
    for line in lines:
        if CANCEL_LOG.search(line):
            print("  log:", line[:240])
    assert not watcher.is_alive() and stopped == 0, "the watcher or the worker hangs"
    assert finals == keys, finals  # every task ends, redelivered or not
    assert fates["bridged"]["cancel tried"] and fates["plain"]["cancel tried"], fates
    assert fates["bridged"] == fates["plain"], {  # (bridged, plain) where they differ
        what: (fates["bridged"][what], fates["plain"][what]) for what in fates["plain"]
        if fates["bridged"][what] != fates["plain"][what]}
    if fates["plain"]["first run raised"]:  # terminated: both at the fault, not at their end
        assert all(runs[kind][0]["finally"] < 3 for kind in keys), runs


# ---------------------------------------------------------------------------------------
# A loop that one task blocks never fails, cancels or times out its neighbours.
# ---------------------------------------------------------------------------------------
def count_run(key: str) -> int:
    """Record one run of a task body under ``key``; return how many runs it has had."""
    path = DATA_DIR / f"runs-{key}"
    with path.open("a") as runs:  # O_APPEND: one whole write per run, whatever the process
        runs.write("x")
    return len(path.read_text())


def runs_of(key: str) -> int:
    path = DATA_DIR / f"runs-{key}"
    return len(path.read_text()) if path.exists() else 0


@bridged_task(app=app, hard_timeout=10)
async def innocent_in_flight(key: str, seconds: float) -> str:
    log.warning("in flight %s", key)
    await asyncio.sleep(seconds)
    count_run(key)
    return _loop_tokens.setdefault(asyncio.get_running_loop(), uuid.uuid4().hex)


@bridged_task(app=app, hard_timeout=0.5)
async def innocent_queued(key: str) -> str:
    count_run(key)
    await asyncio.sleep(0.05)
    return _loop_tokens.setdefault(asyncio.get_running_loop(), uuid.uuid4().hex)


@bridged_task(app=app, hard_timeout=1)
async def blocks_for(key: str, seconds: float) -> None:
    log.warning("blocking %s", key)
    time.sleep(seconds)  # noqa: ASYNC251 - hostile on purpose: never yields to the loop


def test_a_blocked_loop_moves_queued_runs_and_finishes_started_ones(threads: Worker) -> None:
    key, start = uuid.uuid4().hex, len(threads.lines)
    in_flight = threads.send(innocent_in_flight, f"{key}-a", 3.0)
    threads.wait_for(f"in flight {key}-a", timeout=30, start=start)
    blocker = threads.send(blocks_for, key, 5.0)
    threads.wait_for(f"blocking {key}", timeout=30, start=start)
    blocked_at = time.monotonic()
    queued = threads.send(innocent_queued, f"{key}-c")
    # Queued behind the blocked loop for longer than its own hard_timeout=0.5 s: it moves to
    # a fresh loop when the blocker's limit passes (1 s + grace), long before the loop frees.
    moved_to = get(queued)
    assert time.monotonic() - blocked_at < 4.5, "the queued run waited for the loop to free"
    with pytest.raises(HardTimeout):
        get(blocker)
    stayed_on = get(in_flight)
    assert stayed_on != moved_to, "the started run finished on its own loop, the queued moved"
    assert runs_of(f"{key}-a") == 1 and runs_of(f"{key}-c") == 1
    log_lines = "\n".join(threads.lines[start:])
    for bad in ("Exception in callback", "exception was never retrieved", "never awaited"):
        assert bad not in log_lines, "a moved run was started twice"
    assert log_lines.count("blocked its event loop") == 1
    assert f"task {blocks_for.name} blocked its event loop" in log_lines


@bridged_task
async def fails_on_purpose(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


@bridged_task(app=app)
async def async_errback(request: Any, exc: BaseException, traceback: Any) -> None:
    mark(f"errback-{request.id}-{type(exc).__name__}-{traceback is not None}")


@bridged_task
async def audited() -> Optional[str]:
    return AUDITED.get(None)


def wait_for_mark(name: str, timeout: float = 10) -> Optional[float]:
    deadline = time.monotonic() + timeout
    while marked(name) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the mark is written by another process: nothing to wait on
    return marked(name)


def test_async_errback_runs_with_request_exc_and_traceback(prefork: Worker) -> None:
    start = len(prefork.lines)
    result = prefork.send(fails_on_purpose, "boom", link_error=async_errback.s())
    with pytest.raises(ValueError, match="boom"):
        get(result)
    assert wait_for_mark(f"errback-{result.id}-ValueError-True") is not None
    assert "TypeError" not in "\n".join(prefork.lines[start:])


def test_shared_task_is_built_on_each_apps_own_task_class(prefork: Worker) -> None:
    assert isinstance(audited._get_current_object(), AuditTask)
    result = prefork.send(audited)
    assert get(result) == f"before_start {audited.name} {result.id}"


@bridged_task(app=app, hard_timeout=30)
async def stress_ok(key: str, pause: float) -> str:
    count_run(key)
    await asyncio.sleep(pause)
    return key


@bridged_task(app=app, hard_timeout=0.5)
async def stress_blocks(key: str) -> None:
    count_run(key)
    time.sleep(2)  # noqa: ASYNC251 - hostile on purpose


@bridged_task(app=app)
async def stress_raises(key: str) -> None:
    count_run(key)
    raise ValueError(key)


@long_drill
@pytest.mark.timeout(400)
def test_stress_blocked_loops_and_failures_spare_every_other_task() -> None:
    count = int(os.environ.get("RELIER_STRESS_TASKS", "2000"))
    kinds = (["block"] * 5 + ["raise"] * 5 + ["ok"] * 90) * (count // 100)
    rng = random.Random(7)
    rng.shuffle(kinds)
    keys = [f"stress-{RUN_ID}-{i}" for i in range(len(kinds))]
    with running_worker("stress", "threads", 16, "--prefetch-multiplier=20") as worker:
        sent = [worker.send(stress_blocks, key) if kind == "block" else
                worker.send(stress_raises, key) if kind == "raise" else
                worker.send(stress_ok, key, rng.random() / 20) for kind, key in zip(kinds, keys)]
        outcomes: dict[str, int] = {}
        for kind, result in zip(kinds, sent):
            try:
                result.get(timeout=300, interval=0.05, propagate=True)
                outcome = f"{kind}: succeeded"
            except HardTimeout:
                outcome = f"{kind}: HardTimeout"
            except ValueError:
                outcome = f"{kind}: ValueError"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    blocked, failed = kinds.count("block"), kinds.count("raise")
    assert outcomes == {"ok: succeeded": len(kinds) - blocked - failed,
                        "block: HardTimeout": blocked, "raise: ValueError": failed}
    runs = {kind: {runs_of(key) for k, key in zip(kinds, keys) if k == kind} for kind in kinds}
    assert runs["ok"] == runs["raise"] == {1}, "every other body ran exactly once"
    # A blocker given up while its first step waited behind another never takes that step.
    assert runs["block"] <= {0, 1}, "a blocking body ran twice"


# ---------------------------------------------------------------------------------------
# per_loop: one value per event loop, closed on that loop when the loop ends.
# ---------------------------------------------------------------------------------------
MADE: list[str] = []


class LoopValue:
    """A per_loop value that says which loop made it and which loop closed it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.id = uuid.uuid4().hex
        self.closed_on: Optional[asyncio.AbstractEventLoop] = None
        MADE.append(self.id)

    async def aclose(self) -> None:
        self.closed_on = asyncio.get_running_loop()
        log.warning("closed %s on its own loop: %s", self.id, self.closed_on is self.loop)


async def make_loop_value() -> LoopValue:
    await asyncio.sleep(0.2)  # slow enough for concurrent first users to pile up
    return LoopValue()


loop_value = per_loop(make_loop_value)


@bridged_task(app=app)
async def use_loop_value() -> dict[str, Any]:
    value = await loop_value()
    return {"pid": os.getpid(), "value": value.id, "made": len(MADE)}


@bridged_task(app=app, hard_timeout=1)
async def blocks_after_loop_value(seconds: float) -> None:
    await loop_value()
    time.sleep(seconds)  # noqa: ASYNC251 - hostile on purpose


@bridged_task(app=app)
async def loop_value_itself() -> LoopValue:
    return await loop_value()


BAD_LOG = ("Unclosed", "Event loop is closed", "was never awaited", "Task was destroyed",
           "Traceback")


def test_per_loop_makes_one_value_per_child_and_closes_it_there() -> None:
    with running_worker("perloop", "prefork", 2) as worker:
        replies = [get(r) for r in [worker.send(use_loop_value) for _ in range(100)]]
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
    values = {reply["pid"]: reply["value"] for reply in replies}
    assert all(reply["value"] == values[reply["pid"]] for reply in replies)
    assert {reply["made"] for reply in replies} == {1}, "the factory ran once per child"
    for value in values.values():
        assert f"closed {value} on its own loop: True" in worker.log
    for bad in BAD_LOG:
        assert bad not in worker.log


def test_per_loop_concurrent_first_users_share_one_creation() -> None:
    with running_worker("perloop-threads", "threads", 8) as worker:
        replies = [get(r) for r in [worker.send(use_loop_value) for _ in range(16)]]
    assert len({reply["value"] for reply in replies}) == 1
    assert {reply["made"] for reply in replies} == {1}


def test_per_loop_value_of_a_retired_loop_is_closed_once_it_frees(solo: Worker) -> None:
    before = get(solo.send(use_loop_value))["value"]
    start = len(solo.lines)
    with pytest.raises(HardTimeout):
        get(solo.send(blocks_after_loop_value, 3.0))
    after = get(solo.send(use_loop_value))["value"]
    assert after != before, "the fresh loop makes its own value"
    solo.wait_for(f"closed {before} on its own loop: True", timeout=10, start=start)


def test_per_loop_direct_and_eager_calls_make_and_close_within_the_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    direct = loop_value_itself()
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    eager = loop_value_itself.push().get()
    for value in (direct, eager):
        assert value.loop.is_closed() and value.closed_on is value.loop
    assert direct.id != eager.id


def _run_in_a_direct_call(body: Any) -> Any:
    """Run ``body()`` as a bridged task's coroutine called directly, on a disposable loop."""
    @bridged_task(app=app, name=f"direct-{uuid.uuid4().hex}")
    async def direct() -> Any:
        return await body()

    return direct()


def test_per_loop_failed_creation_fails_its_waiters_and_the_next_call_retries() -> None:
    attempts: list[int] = []

    async def flaky() -> str:
        attempts.append(1)
        await asyncio.sleep(0.05)
        if len(attempts) == 1:
            raise OSError("first attempt fails")
        return "made"

    res = per_loop(flaky)

    async def body() -> Any:
        first = await asyncio.gather(res(), res(), return_exceptions=True)
        return first, await res(), await res()

    first, second, third = _run_in_a_direct_call(body)
    assert [type(error) for error in first] == [OSError, OSError]
    assert (second, third, len(attempts)) == ("made", "made", 2)


def test_per_loop_cancelled_waiter_leaves_the_creation_running() -> None:
    async def body() -> Any:
        waiter = asyncio.ensure_future(loop_value())
        await asyncio.sleep(0.05)  # the creation is under way (it takes 0.2 s)
        waiter.cancel()
        made_before = len(MADE)
        value = await loop_value()
        return waiter.cancelled(), len(MADE) - made_before, value

    cancelled, made_after_cancel, value = _run_in_a_direct_call(body)
    assert cancelled and made_after_cancel == 1 and value.closed_on is value.loop


def test_per_loop_closes_newest_first_and_logs_bad_closes(
        caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    def close_good(value: str) -> None:
        closed.append(value)

    async def close_raises(value: str) -> None:
        closed.append(value)
        raise RuntimeError("close failed on purpose")

    async def close_hangs(value: str) -> None:
        closed.append(value)
        await asyncio.sleep(3600)

    async def make(name: str) -> str:
        return name

    good = per_loop(lambda: make("good"), close=close_good)
    raises = per_loop(lambda: make("raises"), close=close_raises)
    hangs = per_loop(lambda: make("hangs"), close=close_hangs)

    async def body() -> list[str]:
        return [await good(), await raises(), await hangs()]

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="relier_bridge"):
        assert _run_in_a_direct_call(body) == ["good", "raises", "hangs"]
    assert closed == ["hangs", "raises", "good"], "newest first, and every one tried"
    assert time.monotonic() - started < relier_bridge.CANCEL_GRACE + 2
    assert "closing 'hangs' took over" in caplog.text
    assert "closing 'raises' raised" in caplog.text


class Heartbeat:
    """A client that works in the background (a heartbeat, a reader), as many do: its job,
    started by the factory, sends a task once released (``go``) and reports the headers."""

    def __init__(self) -> None:
        self.made_in = {"current_task": bool(celery.current_task),
                        "request": makes_a_heartbeat.request.id}
        self.go, self.sent = threading.Event(), concurrent.futures.Future[dict[str, Any]]()
        self.job = asyncio.ensure_future(self.beat())

    async def beat(self) -> None:
        await asyncio.to_thread(self.go.wait, 30)
        try:
            self.sent.set_result(_headers_of_a_send())
        except Exception as exc:
            self.sent.set_exception(exc)

    def close(self) -> None:
        self.job.cancel()


def _headers_of_a_send() -> dict[str, Any]:
    """Send a task from this thread and context: its parent, and whether it is a root."""
    seen: dict[str, Any] = {}

    def note(headers: Optional[dict[str, Any]] = None, **_: Any) -> None:
        if threading.current_thread() is me and headers:
            seen.update(parent_id=headers.get("parent_id"),
                        root=headers.get("root_id") == headers.get("id"))

    me, queue = threading.current_thread(), f"relier-{RUN_ID}-lineage"
    QUEUES.add(queue)
    after_task_publish.connect(note, weak=False)
    try:
        unconsumed.apply_async((0,), queue=queue)
    finally:
        after_task_publish.disconnect(note)
    return seen


heartbeat = per_loop(Heartbeat)


@bridged_task(app=app)
async def makes_a_heartbeat() -> Heartbeat:
    return await heartbeat()


@app.task
def starts_a_thread() -> tuple[threading.Event, concurrent.futures.Future[dict[str, Any]]]:
    go, sent = threading.Event(), concurrent.futures.Future[dict[str, Any]]()

    def job() -> None:
        go.wait(30)
        sent.set_result(_headers_of_a_send())

    threading.Thread(target=job, daemon=True).start()
    return go, sent


def test_per_loop_factory_and_its_jobs_belong_to_no_task() -> None:
    """A plain task's background thread sends with no parent once the task is over; a job
    that a per_loop factory starts on the bridge loop does the same (issue 23, item 4)."""
    def run_as_worker(task: Any) -> Any:
        task.push_request(called_directly=False, id=f"owner-{task.name}", task=task.name,
                          delivery_info={})
        try:
            return task.run()
        finally:
            task.pop_request()

    go, plain_sent = run_as_worker(starts_a_thread)
    go.set()
    try:
        beat = run_as_worker(makes_a_heartbeat)
        beat.go.set()
        no_task = {"parent_id": None, "root": True}
        assert plain_sent.result(30) == no_task, "the reference: a plain task's thread"
        assert beat.sent.result(30) == no_task
        assert beat.made_in == {"current_task": False, "request": None}
    finally:
        relier_bridge.close_bridge_loop()  # and the heartbeat with it


def test_per_loop_refuses_bad_use() -> None:
    with pytest.raises(RuntimeError, match="belongs to an event loop"):
        loop_value()
    with pytest.raises(TypeError, match="callable factory"):
        per_loop(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="close must be callable"):
        per_loop(make_loop_value, close="aclose")  # type: ignore[call-overload]


def test_per_loop_is_typed_by_its_factory(tmp_path: Path) -> None:
    mypy = pytest.importorskip("mypy.api", reason="mypy is not installed: pip install mypy "
                               "to run this")
    snippet = tmp_path / "uses_per_loop.py"
    snippet.write_text(
        "from relier_bridge import per_loop\n"
        "async def make_number() -> int:\n    return 1\n"
        "def make_text() -> str:\n    return ''\n"
        "numbers = per_loop(make_number)\n"
        "texts = per_loop(make_text)\n"
        "async def main() -> None:\n"
        "    reveal_type(await numbers())\n"
        "    reveal_type(await texts())\n")
    out, _, _ = mypy.run(["--strict", "--ignore-missing-imports", "--follow-imports=silent",
                          "--no-incremental", "--config-file=", str(snippet)])
    assert re.search(r'Revealed type is "(builtins\.)?int"', out), out
    assert re.search(r'Revealed type is "(builtins\.)?str"', out), out


# ---------------------------------------------------------------------------------------
# Lineage of tasks sent from a coroutine; aget waits without holding a thread.
# ---------------------------------------------------------------------------------------
@bridged_task(app=app, bind=True)
async def lineage_leaf(self: celery.Task) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"id": self.request.id, "parent_id": self.request.parent_id,
            "root_id": self.request.root_id}


@bridged_task(app=app, bind=True)
async def lineage(self: celery.Task, depth: int) -> dict[str, Any]:
    seen = {"id": self.request.id, "parent_id": self.request.parent_id,
            "root_id": self.request.root_id}
    if depth > 0:
        by_apush = await lineage.apush(depth - 1)
        by_delay = lineage.delay(depth - 1)  # a blocking send on the loop, as teams write it
        chained = celery.chain(lineage_leaf.si(), lineage_leaf.si()).apply_async()
        explicit = lineage_leaf.apply_async(parent_id="explicit-parent", root_id="explicit-root")
        seen["sent"] = {"apush": by_apush.id, "delay": by_delay.id, "chain": chained.id,
                        "chain_first": chained.parent.id, "explicit": explicit.id}
    return seen


def send_from_hook(ctx: SoftContext) -> None:
    lineage_leaf.apply_async(task_id=f"hook-child-{ctx.task_id}")


@bridged_task(app=app, soft_timeout=0.1, hard_timeout=10, on_soft=send_from_hook)
async def sends_from_its_soft_hook() -> None:
    await asyncio.sleep(0.5)


def test_tasks_sent_from_a_coroutine_keep_parent_and_root(prefork: Worker) -> None:
    root = prefork.send(lineage, 2)
    seen = get(root)
    assert seen["parent_id"] is None and seen["root_id"] == root.id, "a root stays a root"
    sent = seen["sent"]
    for how in ("apush", "delay"):
        child = get(app.AsyncResult(sent[how]))
        assert (child["parent_id"], child["root_id"]) == (root.id, root.id), how
        for grandchild in child["sent"].values():
            if grandchild != child["sent"]["explicit"]:
                assert get(app.AsyncResult(grandchild))["root_id"] == root.id
    first = get(app.AsyncResult(sent["chain_first"]))
    second = get(app.AsyncResult(sent["chain"]))
    assert (first["parent_id"], first["root_id"]) == (root.id, root.id)
    assert (second["parent_id"], second["root_id"]) == (first["id"], root.id)
    explicit = get(app.AsyncResult(sent["explicit"]))
    assert (explicit["parent_id"], explicit["root_id"]) == ("explicit-parent", "explicit-root")
    hooked = prefork.send(sends_from_its_soft_hook)
    get(hooked)
    child = get(app.AsyncResult(f"hook-child-{hooked.id}"))
    assert (child["parent_id"], child["root_id"]) == (hooked.id, hooked.id)


def test_aget_returns_raises_and_times_out_like_get(prefork: Worker) -> None:
    async def main() -> None:
        assert await prefork.send(add, 2, 3).aget(timeout=30) == 5
        failing = prefork.send(fails_on_purpose, "aget sees it")
        with pytest.raises(ValueError, match="aget sees it"):
            await failing.aget(timeout=30)
        assert isinstance(await failing.aget(timeout=30, propagate=False), ValueError)
        never = add.AsyncResult(uuid.uuid4().hex)
        with pytest.raises(ResultTimeout, match=rf"task {never.id}: no result within 0.3 s"):
            await never.aget(timeout=0.3)
        assert await (await add.apush(4, 5)).aget(timeout=30) == 9

    asyncio.run(main())


def test_cancelled_aget_leaves_nothing_behind() -> None:
    async def main() -> None:
        never = add.AsyncResult(uuid.uuid4().hex)
        waiter = asyncio.ensure_future(never.aget(interval=0.02))
        await asyncio.sleep(0.2)  # several look-ups have run
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.05)  # the poller, woken as its last waiter left, ends
        assert asyncio.all_tasks() == {asyncio.current_task()}

    threads_before = set(threading.enumerate())  # an earlier test's may still be ending
    asyncio.run(main())  # ends the bridge's threads of that loop: they exit once idle
    _poll(lambda: not set(threading.enumerate()) - threads_before, 5, "the look-up threads to end")


def test_aget_in_eager_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.conf, "task_always_eager", True)

    async def main() -> Any:
        return await (await add.apush(3, 4)).aget()

    assert asyncio.run(main()) == 7


@pytest.mark.timeout(180)
def test_aget_holds_no_thread_while_it_waits() -> None:
    with running_worker("aget", "threads", 50) as worker:
        async def main() -> float:
            long = [worker.send(sleeper, 3.0) for _ in range(40)]
            long_waits = [asyncio.ensure_future(r.aget(timeout=60, interval=0.05)) for r in long]
            await asyncio.sleep(0.1)  # the 40 long waits have begun
            sent = time.monotonic()
            short = [worker.send(sleeper, 0.2) for _ in range(10)]
            assert await asyncio.gather(*(r.aget(timeout=60, interval=0.05) for r in short)) \
                == [0.2] * 10
            took = time.monotonic() - sent
            assert await asyncio.gather(*long_waits) == [3.0] * 40
            return took

        took = asyncio.run(main())
    assert took < 2.0, f"the short tasks' results took {took:.2f} s: they queued behind others"


def test_aget_looks_up_at_once_and_honours_each_waiters_interval() -> None:
    async def main() -> tuple[float, float]:
        stored = add.AsyncResult(uuid.uuid4().hex)
        await asyncio.to_thread(app.backend.store_result, stored.id, 5, "SUCCESS")
        started = time.monotonic()
        assert await stored.aget(timeout=10, interval=5) == 5
        at_once = time.monotonic() - started
        slow = asyncio.ensure_future(add.AsyncResult(uuid.uuid4().hex).aget(interval=5))
        await asyncio.sleep(0.1)  # the poller now serves a 5 s waiter
        brisk = add.AsyncResult(uuid.uuid4().hex)
        waiting = asyncio.ensure_future(brisk.aget(timeout=10, interval=0.05))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(app.backend.store_result, brisk.id, 7, "SUCCESS")
        started = time.monotonic()
        assert await waiting == 7
        slow.cancel()
        return at_once, time.monotonic() - started

    at_once, brisk = asyncio.run(main())
    assert at_once < 1.0, f"a stored result took {at_once:.2f} s: a first-interval floor"
    assert brisk < 1.0, f"a 0.05 s waiter behind a 5 s one took {brisk:.2f} s"


@bridged_task(app=app)
async def awaits_a_result_inside() -> list[str]:
    """aget inside a task: refused as get() is, unless disable_sync_subtasks=False."""
    never = add.AsyncResult(uuid.uuid4().hex)
    seen = [never.id]
    for refuse in (True, False):
        started = time.monotonic()
        try:
            await never.aget(timeout=0.5, disable_sync_subtasks=refuse)
        except Exception as exc:
            seen.append(f"{type(exc).__name__} after {time.monotonic() - started:.2f} s: {exc}")
    return seen


def test_aget_inside_a_task_refuses_as_get_does(solo: Worker) -> None:
    never_id, refused, opted_out = get(solo.send(awaits_a_result_inside))
    assert refused.startswith("RuntimeError after 0.0") and "Never call result.get()" in refused
    assert opted_out.startswith("TimeoutError after 0.5")
    assert f"task {never_id}: no result within 0.5 s" in opted_out


def _join_blocking(how: str, queue: str) -> Any:
    """What legacy code writes inside a task: send a child to this worker and wait for it."""
    if how == "group":
        sent = celery.group(add.s(1, 2), add.s(3, 4)).apply_async(queue=queue)
        return sent.get(timeout=10, interval=0.05, disable_sync_subtasks=False)
    child = add.apply_async((1, 2), queue=queue)
    return getattr(child, how)(timeout=10, interval=0.05, disable_sync_subtasks=False)


@app.task(bind=True)
def plain_joins_a_child(self: celery.Task, how: str) -> Any:
    return _join_blocking(how, self.request.delivery_info["routing_key"])


@bridged_task(app=app, bind=True)
async def bridged_joins_a_child(self: celery.Task, how: str) -> Any:
    started = time.monotonic()
    try:
        return _join_blocking(how, self.request.delivery_info["routing_key"])
    except RuntimeError as exc:
        return f"refused after {time.monotonic() - started:.2f} s: {exc}"


@pytest.mark.timeout(180)
def test_a_blocking_join_inside_a_coroutine_is_refused_not_a_deadlock() -> None:
    """get(), wait() or a group's get() with disable_sync_subtasks=False, inside a bridged
    body: it would block the bridge loop that the child needs (threads pool: every later
    bridged task, then the pool, then warm shutdown hung). A plain task's join works."""
    with running_worker("blocking-join", "threads", 4) as worker:
        for how in ("get", "wait", "group"):
            expected = [3, 7] if how == "group" else 3
            assert get(worker.send(plain_joins_a_child, how), 30) == expected, "the reference"
            refused = get(worker.send(bridged_joins_a_child, how), 30)
            print(f"{how}: {refused}")
            assert re.match(r"refused after 0\.\d\d s: .*would block the event loop.*"
                            r"await result\.aget\(\)", refused), refused
        assert get(worker.send(add, 2, 2), 30) == 4, "the worker serves on"
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0, "warm shutdown completed"


def test_blocking_results_refuse_only_where_they_would_wait_on_a_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a loop get() is Celery's; inside one, a result already known (eager, cached,
    ignored) is still read at once."""
    pending = add.AsyncResult(uuid.uuid4().hex)
    with pytest.raises(ResultTimeout):
        pending.get(timeout=0.1, interval=0.05)
    monkeypatch.setitem(app.conf, "task_always_eager", True)

    async def main() -> Any:
        with pytest.raises(RuntimeError, match=r"await result\.aget"):
            pending.wait(timeout=0.1)
        ignored = add.AsyncResult(uuid.uuid4().hex)
        ignored.ignored = True
        assert ignored.get() is None
        return add.apply((1, 2)).get(), (await add.apush(3, 4)).get()

    assert asyncio.run(main()) == (3, 7)


class OwnResult(AsyncResult):  # type: ignore[misc]
    """A base's own result class."""


class OwnEagerResult(celery.result.EagerResult):  # type: ignore[misc]
    """A base's own eager result class."""


class OwnBase(AuditTask):
    """A ``base=`` with its own apply and AsyncResult, as teams write for tracing."""

    applied: ClassVar[list[str]] = []

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        OwnBase.applied.append(self.name)
        return OwnEagerResult(*super().apply(*args, **kwargs).__reduce_args__())

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        return OwnResult(task_id, backend=self.backend, task_name=self.name, app=self.app,
                         **kwargs)


@app.task(base=OwnBase)
def plain_on_own_base(x: int) -> int:
    return x


@bridged_task(app=app, base=OwnBase)
async def bridged_on_own_base(x: int) -> int:
    await asyncio.sleep(0)
    return x


@bridged_task(app=app, base=OwnBase)
def sync_bridged_on_own_base(x: int) -> int:
    return x


@pytest.mark.parametrize("task", [plain_on_own_base, bridged_on_own_base,
                                  sync_bridged_on_own_base], ids=lambda task: task.__name__)
def test_a_bases_own_apply_and_async_result_are_honoured(task: Any) -> None:
    OwnBase.applied.clear()
    result = task.apply((7,))
    assert (type(result), result.get(), OwnBase.applied) == (OwnEagerResult, 7, [task.name])
    assert type(task.AsyncResult("an-id")) is OwnResult
    # Without a base of its own, a bridged task's results are awaitable ones.
    assert isinstance(add.apply((1, 2)), BridgedResult)
    assert type(add.AsyncResult("an-id")) is BridgedResult


def test_apush_and_aget_do_not_queue_behind_the_default_executor(prefork: Worker) -> None:
    finished = add.push(2, 2)
    assert get(finished) == 4

    async def main() -> tuple[float, float]:
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(2))
        busy = [asyncio.ensure_future(asyncio.to_thread(time.sleep, 2)) for _ in range(3)]
        await asyncio.sleep(0.1)  # the application's to_thread threads are all taken
        started = time.monotonic()
        sent = await add.apush(3, 3)
        pushed = time.monotonic() - started
        started = time.monotonic()
        assert await add.AsyncResult(finished.id).aget(timeout=10) == 4
        awaited = time.monotonic() - started
        assert await sent.aget(timeout=30) == 6
        await asyncio.gather(*busy)
        return pushed, awaited

    pushed, awaited = asyncio.run(main())
    assert pushed < 1.0, f"apush took {pushed:.2f} s: it queued behind the default executor"
    assert awaited < 1.0, f"aget took {awaited:.2f} s: it queued behind the default executor"


@bridged_task
async def total(values: list[int]) -> int:
    await asyncio.sleep(0)
    return sum(values)


def test_readme_group_and_chord_from_async_code(prefork: Worker) -> None:
    async def doubled_and_total(numbers: list[int]) -> tuple[list[int], int]:  # as in README
        header = celery.group([add.s(n, n) for n in numbers])
        sent = await asyncio.to_thread(header.apply_async)  # a GroupResult
        doubled = await asyncio.gather(*(r.aget(timeout=30) for r in sent.results))
        chord = celery.chord(header, total.s())  # total: sums a list
        return doubled, await (await asyncio.to_thread(chord.apply_async)).aget(timeout=30)

    assert asyncio.run(doubled_and_total([1, 2, 3])) == ([2, 4, 6], 12)


def _redis_result_url() -> Optional[str]:
    backend = str(app.conf.result_backend)
    if backend.startswith("redis"):
        return backend
    return os.environ.get("RELIER_REDIS_URL") or (
        BROKER_URL if BROKER_URL.startswith("redis") else None)


@pytest.mark.skipif(not _redis_result_url(), reason="needs a Redis result backend "
                    "(RELIER_RESULT_BACKEND=redis://...), a Redis broker or RELIER_REDIS_URL")
def test_aget_is_as_prompt_as_get_on_redis() -> None:
    redis_app = celery.Celery("relier-latency", backend=_redis_result_url(),
                              set_as_current=False)
    redis_app.conf.result_expires = 60
    backend = redis_app.backend  # one backend for both threads (Celery keeps one per thread)
    loop = asyncio.new_event_loop()
    latencies: dict[str, list[float]] = {"aget": [], "get": []}

    def wait_once(how: str) -> None:
        result = relier_bridge.BridgedResult(uuid.uuid4().hex, backend=backend, app=redis_app)
        stored: list[float] = []

        def store() -> None:
            time.sleep(random.uniform(0.05, 0.4))
            stored.append(time.monotonic())
            backend.store_result(result.id, 42, "SUCCESS")

        storer = threading.Thread(target=store)
        storer.start()
        if how == "aget":
            assert loop.run_until_complete(result.aget(timeout=10)) == 42
        else:
            assert result.get(timeout=10) == 42
        latencies[how].append(time.monotonic() - stored[0])
        storer.join()

    try:
        for _ in range(12):
            wait_once("aget")
            wait_once("get")
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    aget, get_ = (statistics.median(latencies[how]) for how in ("aget", "get"))
    assert aget <= max(0.025, 3 * get_), f"aget {aget * 1e3:.1f} ms, get() {get_ * 1e3:.1f} ms"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _private_redis(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return server
        if time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"private redis-server on port {port} did not start")
        time.sleep(0.05)


@pytest.mark.skipif(not shutil.which("redis-server") or not importlib.util.find_spec("redis"),
                    reason="needs redis-server on PATH and pip install redis")
def test_aget_rides_out_a_redis_restart(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    servers = [_private_redis(port)]
    try:
        outage_app = celery.Celery("relier-outage", backend=f"redis://127.0.0.1:{port}/0",
                                   set_as_current=False)
        backend = outage_app.backend

        async def main() -> list[Any]:
            results = [relier_bridge.BridgedResult(uuid.uuid4().hex, backend=backend,
                                                   app=outage_app) for _ in range(5)]
            waits = [asyncio.ensure_future(r.aget(timeout=30)) for r in results]
            await asyncio.sleep(0.3)  # the waits have begun polling
            servers[0].kill()
            servers[0].wait()
            await asyncio.sleep(1.0)  # many look-ups fail meanwhile
            assert not any(wait.done() for wait in waits), "a wait ended in the outage"
            servers.append(_private_redis(port))
            for n, result in enumerate(results):
                await asyncio.to_thread(backend.store_result, result.id, n, "SUCCESS")
            return await asyncio.gather(*waits)

        with caplog.at_level(logging.WARNING, logger="relier_bridge"):
            assert asyncio.run(main()) == [0, 1, 2, 3, 4]
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1, "the outage is logged once, not once per look-up"
    finally:
        for server in servers:
            server.kill()
            server.wait()


def test_bridged_result_is_typed_by_its_task(tmp_path: Path) -> None:
    mypy = pytest.importorskip("mypy.api")
    snippet = tmp_path / "uses_aget.py"
    snippet.write_text(
        "from relier_bridge import bridged_task\n"
        "@bridged_task\n"
        "async def add(x: int, y: int) -> int:\n    return x + y\n"
        "async def main() -> None:\n"
        "    reveal_type(await (await add.apush(1, 2)).aget())\n"
        "    reveal_type(await add.push(1, 2).aget(timeout=1))\n")
    out, _, _ = mypy.run(["--strict", "--ignore-missing-imports", "--follow-imports=silent",
                          "--no-incremental", "--config-file=", str(snippet)])
    assert len(re.findall(r'Revealed type is "(builtins\.)?int"', out)) == 2, out


# ---------------------------------------------------------------------------------------
# Real async clients: redis.asyncio per process; SQLAlchemy's async engine made at import.
# ---------------------------------------------------------------------------------------
REDIS_URL = os.environ.get("RELIER_REDIS_URL") or (
    BROKER_URL if BROKER_URL.startswith("redis") else None)
NEEDS_REDIS = ("needs a Redis server: set RELIER_REDIS_URL=redis://... or a redis:// "
               "RELIER_BROKER_URL (and pip install redis) to run this")
POSTGRES_URL = os.environ.get("RELIER_POSTGRES_URL")
_redis_clients: dict[int, Any] = {}
if POSTGRES_URL:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    # Made at import, in the worker's parent process, before any child is forked.
    ENGINE = create_async_engine(POSTGRES_URL, pool_size=2)


@bridged_task(app=app)
async def redis_round_trip(key: str) -> dict[str, Any]:
    import redis.asyncio

    client = _redis_clients.get(os.getpid())
    if client is None:
        assert REDIS_URL is not None
        client = _redis_clients[os.getpid()] = redis.asyncio.Redis.from_url(REDIS_URL)
    await client.set(key, key, ex=60)
    return {"value": (await client.get(key)).decode(), "pid": os.getpid(), "client": id(client)}


@bridged_task(app=app)
async def postgres_query(n: int) -> dict[str, Any]:
    async with ENGINE.connect() as connection:
        value = (await connection.execute(text("SELECT :n + 1"), {"n": n})).scalar_one()
    return {"value": value, "pid": os.getpid()}


@pytest.mark.skipif(not REDIS_URL, reason=NEEDS_REDIS)
@pytest.mark.timeout(240)
def test_redis_asyncio_client_reused_across_500_tasks(prefork: Worker) -> None:
    start = len(prefork.lines)
    keys = [f"relier-{RUN_ID}-{i}" for i in range(500)]
    replies = [get(r, timeout=120) for r in [prefork.send(redis_round_trip, k) for k in keys]]
    assert [reply["value"] for reply in replies] == keys
    clients: dict[int, set[int]] = {}
    for reply in replies:
        clients.setdefault(reply["pid"], set()).add(reply["client"])
    assert all(len(ids) == 1 for ids in clients.values()), "one client per process"
    for bad in ("different loop", "Event loop is closed"):
        assert bad not in "\n".join(prefork.lines[start:])


@pytest.mark.skipif(not POSTGRES_URL, reason="needs PostgreSQL: set RELIER_POSTGRES_URL="
                    "postgresql+asyncpg://... (and pip install 'sqlalchemy[asyncio]' asyncpg) "
                    "to run this")
def test_sqlalchemy_async_engine_made_at_import_serves_forked_children(prefork: Worker) -> None:
    start = len(prefork.lines)
    replies = [get(r, timeout=60) for r in [prefork.send(postgres_query, n) for n in range(50)]]
    assert [reply["value"] for reply in replies] == [n + 1 for n in range(50)]
    for bad in ("different loop", "Event loop is closed"):
        assert bad not in "\n".join(prefork.lines[start:])


# ---------------------------------------------------------------------------------------
# Truthful under faults, and what a plain task does: a given-up run takes no further step,
# Celery's soft_time_limit reaches the body, each call sees its own request and trail.
# ---------------------------------------------------------------------------------------
WAKE_UPS: dict[str, asyncio.Event] = {}


@bridged_task(app=app, hard_timeout=3)  # the blocker has 3 s to start, on a busy machine too
async def woken_behind_a_blocker(key: str) -> None:
    WAKE_UPS[key] = asyncio.Event()
    log.warning("waiting %s", key)
    try:
        await WAKE_UPS[key].wait()
        count_run(f"{key}-went-on")  # the side effect that must not follow a reported failure
    finally:
        count_run(f"{key}-finally")


@bridged_task(app=app)
async def wakes_then_blocks(key: str, seconds: float) -> None:
    WAKE_UPS[key].set()  # the waiter's wake-up is queued behind this very step
    time.sleep(seconds)  # noqa: ASYNC251 - hostile on purpose: never yields to the loop


def test_a_run_given_up_takes_no_further_step_and_names_the_blocker(threads: Worker) -> None:
    key, start = uuid.uuid4().hex, len(threads.lines)
    healthy = threads.send(woken_behind_a_blocker, key)
    threads.wait_for(f"waiting {key}", timeout=30, start=start)
    blocker = threads.send(wakes_then_blocks, key, 8.0)  # past the waiter's 3 s + grace
    with pytest.raises(HardTimeout) as caught:
        get(healthy)
    assert f"task {wakes_then_blocks.name} held its event loop" in str(caught.value)
    get(blocker, timeout=60)  # the loop is free again: the queued wake-up has had its turn
    _poll(lambda: runs_of(f"{key}-finally") == 1, 10, "the given-up body's finally")
    assert runs_of(f"{key}-went-on") == 0, "the body went on after its failure was stored"


@bridged_task(app=app)
async def blocks_its_first_step(key: str) -> None:
    count_run(key)
    time.sleep(0.1)  # noqa: ASYNC251 - inside the start of the run, on 3.12+ (eager start)
    await asyncio.sleep(0)


@pytest.mark.timeout(180)
def test_runs_moved_off_a_blocked_loop_start_once_and_cleanly() -> None:
    key = uuid.uuid4().hex
    with running_worker("moves", "threads", 32) as worker:
        blocker = worker.send(blocks_for, key, 3.0)
        worker.wait_for(f"blocking {key}", timeout=30)
        # Queued on the blocked loop; they move when it retires (1 s + grace) and start one
        # by one on the fresh loop, while the old one frees (3 s) and runs its own starts.
        moved = [worker.send(blocks_its_first_step, f"{key}-{n}") for n in range(30)]
        for result in moved:
            get(result, timeout=60)
        with pytest.raises(HardTimeout):
            get(blocker)
        log_lines = worker.log
    assert [runs_of(f"{key}-{n}") for n in range(30)] == [1] * 30
    for bad in ("cannot enter context", "Exception in callback", "never awaited"):
        assert bad not in log_lines


CLOSED_ON_OWN_LOOP: list[bool] = []


class ForeignLoopValue:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def aclose(self) -> None:
        CLOSED_ON_OWN_LOOP.append(asyncio.get_running_loop() is self.loop)


foreign_loop_value = per_loop(ForeignLoopValue)


def test_per_loop_values_on_foreign_loops_are_closed_and_freed() -> None:
    kept: list[weakref.ref[Any]] = []

    async def use() -> None:
        kept.append(weakref.ref(await foreign_loop_value()))
        kept.append(weakref.ref(asyncio.get_running_loop()))

    CLOSED_ON_OWN_LOOP.clear()
    for _ in range(1000):
        asyncio.run(use())
    with asyncio.Runner() if sys.version_info >= (3, 11) else contextlib.nullcontext() as runner:
        if runner is not None:
            runner.run(use())
    gc.collect()
    assert len(CLOSED_ON_OWN_LOOP) == len(kept) // 2 and all(CLOSED_ON_OWN_LOOP)
    assert not [ref for ref in kept if ref() is not None], "a closed loop or its value is kept"
    assert not relier_bridge._loop_values


@pytest.mark.skipif(not REDIS_URL, reason=NEEDS_REDIS)
def test_per_loop_redis_clients_on_asyncio_run_loops_close_their_connections() -> None:
    import redis
    import redis.asyncio

    name = f"relier-foreign-{uuid.uuid4().hex[:8]}"
    client = per_loop(lambda: redis.asyncio.Redis.from_url(REDIS_URL, client_name=name))

    async def use() -> None:
        await (await client()).ping()

    for _ in range(50):
        asyncio.run(use())
    clients = redis.Redis.from_url(REDIS_URL).client_list()
    assert [c for c in clients if c.get("name") == name] == []


CRAWLED: dict[int, tuple[str, list[Any]]] = {}


@bridged_task(app=app, bind=True)
async def crawl(self: celery.Task, page: int) -> None:
    CRAWLED[page] = (self.request.id, list(self.request.args))
    if page < 2:
        await crawl.apush(page + 1)


def test_each_eager_call_sees_its_own_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    CRAWLED.clear()
    crawl.delay(0)
    assert [CRAWLED[page][1] for page in range(3)] == [[0], [1], [2]]
    assert len({CRAWLED[page][0] for page in range(3)}) == 3


@bridged_task(app=app, bind=True)
async def sends_children(self: celery.Task) -> list[str]:
    by_apush = await lineage_leaf.apush()
    by_delay = lineage_leaf.delay()
    return [by_apush.id, by_delay.id]


def test_tasks_sent_from_a_coroutine_join_its_children(prefork: Worker) -> None:
    parent = prefork.send(sends_children)
    sent = get(parent)
    stored = app.AsyncResult(parent.id)
    _poll(lambda: stored.children, 10, "the parent's stored children", state=None)
    assert sorted(child.id for child in stored.children) == sorted(sent)


@bridged_task(app=app, hard_timeout=1)
async def blocks_a_direct_call() -> None:
    time.sleep(5)  # noqa: ASYNC251 - hostile on purpose: never yields to the loop


def test_direct_call_hard_timeout_comes_on_time() -> None:
    start = time.monotonic()
    with pytest.raises(HardTimeout):
        blocks_a_direct_call()
    took = time.monotonic() - start
    assert took < 1 + relier_bridge.CANCEL_GRACE + 0.8, f"HardTimeout came {took:.2f} s late"


@bridged_task(app=app, bind=True, soft_time_limit=1)
async def recovers_from_soft_limit(self: celery.Task) -> int:
    try:
        await asyncio.sleep(8)
    except SoftTimeLimitExceeded:
        return 0
    return 8


@bridged_task(app=app, bind=True, soft_time_limit=1)
async def cleans_up_after_soft_limit(self: celery.Task) -> None:
    try:
        await asyncio.sleep(8)
    except SoftTimeLimitExceeded:
        await asyncio.sleep(0.1)  # async cleanup, then the failure goes on
        mark(f"cleaned-{self.request.id}")
        raise


def test_celery_soft_time_limit_is_raised_in_the_coroutine(prefork: Worker) -> None:
    assert get(prefork.send(recovers_from_soft_limit)) == 0
    failing = prefork.send(cleans_up_after_soft_limit)
    with pytest.raises(SoftTimeLimitExceeded):
        get(failing)
    assert marked(f"cleaned-{failing.id}") is not None


@bridged_task(app=app)
async def runs_a_canvas_eagerly() -> list[int]:
    # As in a plain task, Celery refuses .get() inside an eager task unless told otherwise.
    chained = celery.chain(add.s(1, 2), add.s(3)).apply_async()
    chorded = celery.chord([add.s(1, 1), add.s(2, 2)])(total.s())
    return [r.get(disable_sync_subtasks=False) for r in (chained, chorded, add.delay(5, 5))]


@bridged_task(app=app, bind=True, max_retries=2, default_retry_delay=0)
async def retries_eagerly(self: celery.Task) -> int:
    if self.request.retries < 2:
        raise self.retry()
    return int(self.request.retries)


def test_eager_canvas_inside_a_coroutine_runs_as_for_plain_tasks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    assert runs_a_canvas_eagerly.delay().get() == [6, 6, 10]
    assert retries_eagerly.delay().get(disable_sync_subtasks=False) == 2
    assert "apush" in call_directly_inside.delay().get()  # a direct call: refused, as before


try:
    import pydantic
except ImportError:  # the pydantic drill then skips
    pydantic = None
PYDANTIC = pydantic is not None and tuple(celery.VERSION[:2]) >= (5, 5)

if PYDANTIC:
    class Order(pydantic.BaseModel):  # type: ignore[name-defined, misc]
        item: str
        quantity: int

    @bridged_task(app=app, pydantic=True)
    async def doubled(order: Order) -> Order:
        return Order(item=order.item.upper(), quantity=order.quantity * 2)

    @bridged_task(app=app, pydantic=True, bind=True)
    async def doubled_bound(self: celery.Task, order: Order) -> Order:
        return Order(item=order.item, quantity=order.quantity * 2)

    @app.task(pydantic=True)
    def doubled_plain(order: Order) -> Order:
        return Order(item=order.item.upper(), quantity=order.quantity * 2)

    @app.task(pydantic=True, bind=True)
    def doubled_bound_plain(self: celery.Task, order: Order) -> Order:
        return Order(item=order.item, quantity=order.quantity * 2)


def _outcome(result: AsyncResult) -> Any:
    try:
        return get(result)
    except Exception as exc:  # pydantic's errors come back from the backend as Exception
        return "ValidationError" if "ValidationError" in repr(exc) else type(exc).__name__


@pytest.mark.skipif(not PYDANTIC, reason="pydantic=True: pip install pydantic, Celery 5.5+")
def test_pydantic_validates_arguments_and_dumps_results(prefork: Worker) -> None:
    seen = {(bridged.name, str(order)): (_outcome(prefork.send(bridged, order)),
                                         _outcome(prefork.send(plain, order)))
            for bridged, plain in ((doubled, doubled_plain), (doubled_bound, doubled_bound_plain))
            for order in ({"item": "tea", "quantity": 2}, {"item": "tea"})}
    assert all(bridged == plain for bridged, plain in seen.values()), seen  # as a plain task
    if tuple(celery.VERSION[:2]) >= (5, 6):  # 5.5 reads no string annotations, plain or not
        assert [bridged for bridged, _ in seen.values()] == [
            {"item": "TEA", "quantity": 4}, "ValidationError",
            {"item": "tea", "quantity": 4}, "ValidationError"], seen


@bridged_task(app=app, bind=True)
async def priority_seen(self: celery.Task) -> Optional[int]:
    await asyncio.sleep(0)
    return (self.request.delivery_info or {}).get("priority")  # type: ignore[no-any-return]


@bridged_task(app=app)
async def sends_with_inherited_priority() -> str:
    return (await priority_seen.apush()).id


@app.task
def plain_sends_with_inherited_priority() -> str:
    return str(priority_seen.delay().id)


def test_children_inherit_the_parent_priority_as_from_a_plain_task(prefork: Worker) -> None:
    plain_child = get(prefork.send(plain_sends_with_inherited_priority, priority=5))
    bridged_child = get(prefork.send(sends_with_inherited_priority, priority=5))
    assert get(app.AsyncResult(plain_child)) == 5
    assert get(app.AsyncResult(bridged_child)) == 5


# ---------------------------------------------------------------------------------------
# Cancellation as asyncio means it: each body runs twice, under asyncio.run with a cancel at
# the same moment (the reference), and on a worker under Celery's soft_time_limit (prefork)
# or hard_timeout (threads). Same steps, same outcome: CancelledError there is the stop here.
# ---------------------------------------------------------------------------------------
STOP_AT = 1.0  # the soft_time_limit and hard_timeout of these bodies, and the reference's cancel
# How long a body holds its loop across the stop. hard_timeout lands on time, but the give-up
# comes CANCEL_GRACE later; Celery's soft limit comes up to a second late.
SPAN = {"hard": STOP_AT, "soft": 3 * STOP_AT}


async def ticking(key: str, name: str) -> None:
    """A child that steps until it is cancelled: no tick may follow its body's outcome."""
    note(key, f"{name}-start")
    try:
        while True:
            await asyncio.sleep(0.05)
            note(key, f"{name}-tick")
    finally:
        note(key, f"{name}-end")


async def in_taskgroup(key: str, span: float) -> None:
    async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined, unused-ignore]
        group.create_task(ticking(key, "child"))
        note(key, "waiting")
        await asyncio.sleep(30)


async def in_anyio_group(key: str, span: float) -> None:
    import anyio

    async with anyio.create_task_group() as group:
        group.start_soon(ticking, key, "child")
        note(key, "waiting")
        await anyio.sleep(30)


async def in_wait_for(key: str, span: float) -> None:
    note(key, "waiting")
    await asyncio.wait_for(ticking(key, "child"), 30)


async def in_gather(key: str, span: float) -> None:
    note(key, "waiting")
    await asyncio.gather(ticking(key, "a"), ticking(key, "b"))


async def _handed_on(key: str, span: float, guard: Any) -> None:
    """A holds ``guard``, then B (this body), then C queue for it. A hands it over while the
    stop arrives (A blocks the loop across the stop): stopped in the hand-off, B must hand
    it on to C, as asyncio's Lock and Semaphore do for a cancelled waiter."""
    async def hold() -> None:
        async with guard:
            note(key, "A-got")
            await asyncio.sleep(STOP_AT / 2)
            time.sleep(span)  # noqa: ASYNC251 (blocks the loop across the stop)
        note(key, "A-released")

    async def third() -> None:
        await asyncio.sleep(STOP_AT / 10)  # queues after B
        async with guard:
            note(key, "C-got")

    others = [asyncio.ensure_future(hold()), asyncio.ensure_future(third())]
    await asyncio.sleep(0)  # A takes it
    try:
        async with guard:
            note(key, "B-got")
    finally:
        await asyncio.wait(others, timeout=3)  # cleanup after a stop: C got it
        note(key, "B-end")


async def lock_handed_on(key: str, span: float) -> None:
    await _handed_on(key, span, asyncio.Lock())


async def semaphore_handed_on(key: str, span: float) -> None:
    await _handed_on(key, span, asyncio.Semaphore(1))


async def condition_notified(key: str, span: float) -> None:
    """B (this body) waits on a Condition; it is notified while the stop arrives."""
    condition = asyncio.Condition()

    async def notify() -> None:
        await asyncio.sleep(STOP_AT / 2)
        async with condition:
            condition.notify(1)
            time.sleep(span)  # noqa: ASYNC251 (blocks the loop across the stop)
        note(key, "notified")

    notifier = asyncio.ensure_future(notify())
    try:
        async with condition:
            await condition.wait()
            note(key, "B-woken")
    finally:
        note(key, f"B-locked-{condition.locked()}")
        await asyncio.wait([notifier], timeout=3)


async def in_shield(key: str, span: float) -> None:
    """The shielded work goes on past the stop; the body waits for it, then stops."""
    async def commit() -> None:
        await asyncio.sleep(STOP_AT / 2 + span)
        note(key, "committed")

    work = asyncio.ensure_future(commit())
    try:
        note(key, "waiting")
        await asyncio.shield(work)
    except (SoftTimeLimitExceeded, asyncio.CancelledError):
        note(key, f"stopped-committed-{work.done()}")
        await work
        raise


async def recovers(key: str, span: float) -> str:
    try:
        note(key, "waiting")
        await asyncio.sleep(30)
    except (SoftTimeLimitExceeded, asyncio.CancelledError):  # the same line catches both
        await asyncio.sleep(0.1)
        note(key, "recovered")
        return "recovered"
    return "slept"


async def cleanup_in_expired_timeout(key: str, span: float) -> str:
    """The stop lands in cleanup that runs inside an expired asyncio.timeout: the timeout
    must count two cancels and let the stop through, not turn it into its TimeoutError."""
    try:
        async with asyncio.timeout(STOP_AT / 5):  # type: ignore[attr-defined, unused-ignore]
            try:
                await asyncio.sleep(30)
            finally:
                note(key, "cleanup")
                await asyncio.sleep(30)
    except TimeoutError:
        note(key, "timed-out")
        await asyncio.sleep(0.1)
        note(key, "went-on")
    return "went on"


STOPPABLE = {body.__name__: body for body in (
    in_taskgroup, in_anyio_group, in_wait_for, in_gather, in_shield, lock_handed_on,
    semaphore_handed_on, condition_notified, recovers)}
SOFT_STOPPED = {name: bridged_task(app=app, soft_time_limit=STOP_AT, name=f"soft_{name}")(body)
                for name, body in STOPPABLE.items()}
HARD_STOPPED = {name: bridged_task(app=app, hard_timeout=STOP_AT, name=f"hard_{name}")(body)
                for name, body in {**STOPPABLE, "cleanup_in_expired_timeout":
                                   cleanup_in_expired_timeout}.items()}


def _steps(key: str) -> list[str]:
    """The body's steps in order, but the ticks (their number is timing)."""
    return [event for event, _, _ in journal(key) if not event.endswith("-tick")]


def _reference(name: str, key: str, kind: str) -> Any:
    """The body under asyncio.run, cancelled at STOP_AT: from another thread, as Celery's
    signal comes, or by a timer on the loop, as hard_timeout's."""
    body = {**STOPPABLE, "cleanup_in_expired_timeout": cleanup_in_expired_timeout}[name]

    async def cancelled_at() -> Any:
        task = asyncio.ensure_future(body(key, SPAN[kind]))
        loop = asyncio.get_running_loop()
        if kind == "hard":
            loop.call_later(STOP_AT, task.cancel)
            return await task
        timer = threading.Timer(STOP_AT, loop.call_soon_threadsafe, (task.cancel,))
        timer.start()
        try:
            return await task
        finally:
            timer.cancel()

    try:
        return asyncio.run(cancelled_at())
    except asyncio.CancelledError:
        return "stopped"


def _needs(name: str) -> None:
    if name in ("in_taskgroup", "cleanup_in_expired_timeout") and sys.version_info < (3, 11):
        pytest.skip("asyncio.TaskGroup and asyncio.timeout are Python 3.11+")
    if name == "in_anyio_group" and importlib.util.find_spec("anyio") is None:
        pytest.skip("needs anyio (pip install anyio, or the test extra: httpx brings it)")


def _compare(name: str, worker: Worker, kind: str) -> None:
    _needs(name)
    tasks, stop = {"hard": (HARD_STOPPED, HardTimeout),
                   "soft": (SOFT_STOPPED, SoftTimeLimitExceeded)}[kind]
    reference_key, bridged_key = (f"{side}-{name}-{uuid.uuid4().hex}" for side in "rb")
    sent, result = time.time(), worker.send(tasks[name], bridged_key, SPAN[kind])
    expected = _reference(name, reference_key, kind)  # meanwhile
    try:
        outcome = get(result)
    except stop:
        outcome = "stopped"
    seen = len(journal(bridged_key))
    time.sleep(0.3)  # six ticks' time: a child left running would step meanwhile
    assert journal(bridged_key)[seen:] == [], "the body went on after its outcome was stored"
    timed = [(event, round(at - sent, 2)) for event, at, _ in journal(bridged_key)]
    assert (outcome, _steps(bridged_key)) == (expected, _steps(reference_key)), timed


@pytest.mark.parametrize("name", sorted(STOPPABLE))
def test_celery_soft_limit_stops_a_body_as_a_cancel_stops_it_under_asyncio_run(
        name: str, prefork: Worker) -> None:
    _compare(name, prefork, "soft")


@pytest.mark.parametrize("name", sorted(HARD_STOPPED))
def test_hard_timeout_stops_a_body_as_a_cancel_stops_it_under_asyncio_run(
        name: str, threads: Worker) -> None:
    if name == "recovers":  # a body that swallows the cancel fails all the same: a hard stop
        pytest.skip("hard_timeout fails the task even if the body recovers: tested elsewhere")
    _compare(name, threads, "hard")


# ---------------------------------------------------------------------------------------
# per_loop with real clients: each loop's connections close when that loop ends.
# ---------------------------------------------------------------------------------------
CLIENTS_NAME = f"relier-{RUN_ID}-clients"  # how the servers tell these clients' connections


@celery.signals.worker_shutdown.connect  # after relier_bridge's handler, which ends the loop
def _hold_exit_for_inspection(**_: Any) -> None:
    """Let the test look at the servers after warm shutdown closed the loop, but before the
    process exits (which would close every socket anyway)."""
    if os.environ.get("RELIER_CLIENTS_HOLD_EXIT"):
        mark(f"clients-held-{os.getpid()}")
        deadline = time.monotonic() + 30
        while marked(f"clients-release-{os.getpid()}") is None and time.monotonic() < deadline:
            time.sleep(0.05)


class LoopWitness:
    """The oldest per_loop value of a loop: closed last (newest first), it logs that the
    loop's values were all closed, which process exit alone never would."""

    def __init__(self) -> None:
        self.token = _loop_tokens.setdefault(asyncio.get_running_loop(), uuid.uuid4().hex)

    def close(self) -> None:
        log.warning("per_loop values closed on loop %s", self.token)


def _make_http_client() -> Any:
    import httpx

    return httpx.AsyncClient(base_url=os.environ["RELIER_CLIENTS_HTTP_URL"], trust_env=False,
                             limits=httpx.Limits(keepalive_expiry=60))


def _make_redis_client() -> Any:
    import redis.asyncio

    assert REDIS_URL is not None
    return redis.asyncio.Redis.from_url(REDIS_URL, client_name=CLIENTS_NAME)


def _make_engine() -> Any:
    assert POSTGRES_URL is not None
    return create_async_engine(POSTGRES_URL, connect_args={
        "server_settings": {"application_name": CLIENTS_NAME}})


loop_witness = relier_bridge.per_loop(LoopWitness)  # closed by its close()
http_client = relier_bridge.per_loop(_make_http_client)  # closed by its aclose()
redis_client = relier_bridge.per_loop(_make_redis_client)  # closed by its aclose()
engine = relier_bridge.per_loop(_make_engine, close=lambda e: e.dispose())


@bridged_task(app=app)
async def use_real_clients() -> dict[str, Any]:
    """Use every configured client once; say which server-side connection each one used."""
    seen: dict[str, Any] = {"loop": (await loop_witness()).token}
    response = await (await http_client()).get("/")
    response.raise_for_status()
    seen["http"] = int(response.text)
    if REDIS_URL:
        seen["redis"] = await (await redis_client()).client_id()
    if POSTGRES_URL:
        async with (await engine()).connect() as connection:
            seen["postgres"] = (await connection.execute(text("SELECT pg_backend_pid()"))
                                ).scalar_one()
    return seen


@bridged_task(app=app, hard_timeout=1)
async def blocks_its_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251 - hostile on purpose: never yields to the loop


def _start_counting_http_server() -> Any:
    """An HTTP/1.1 keep-alive server on 127.0.0.1, serving in a thread, that knows which
    connections are open: ``open`` (their numbers), ``opened`` (so far), ``peak`` (at once)."""
    import http.server

    class CountingHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection serves request after request

        def setup(self) -> None:
            super().setup()
            with server.lock:
                server.opened += 1
                self.number = server.opened
                server.open.add(self.number)
                server.peak = max(server.peak, len(server.open))

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                with server.lock:
                    server.open.discard(self.number)

        def do_GET(self) -> None:
            body = str(self.number).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    server.daemon_threads = True
    server.lock, server.open, server.opened, server.peak = threading.Lock(), set(), 0, 0
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def counting_http_server() -> Iterator[Any]:
    server = _start_counting_http_server()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _postgres_backends() -> set[int]:
    """The server processes of PostgreSQL connections named CLIENTS_NAME."""
    import asyncpg
    from sqlalchemy.engine import make_url

    assert POSTGRES_URL is not None
    dsn = make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(
        hide_password=False)

    async def query() -> set[int]:
        connection = await asyncpg.connect(dsn)
        try:
            rows = await connection.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1", CLIENTS_NAME)
        finally:
            await connection.close()
        return {row["pid"] for row in rows}

    return asyncio.run(query())


def _poll(check: Any, timeout: float, what: str, state: Any = None) -> None:
    """Wait until ``check()`` is true; fail saying ``what`` did not happen, and ``state()``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; {state() if state else ''}")
        time.sleep(0.05)


def _whole_log(worker: Worker, timeout: float = 10) -> str:
    """The worker's log once its reader has read the pipe to the end (the process exited)."""
    reader = worker._read  # the bound method a live reader thread still holds as its target
    _poll(lambda: not any(getattr(thread, "_target", None) == reader
                          for thread in threading.enumerate()), timeout, "log read to its end")
    return worker.log


@pytest.mark.timeout(150)
def test_per_loop_real_clients_close_their_connections_when_the_loop_ends(
        counting_http_server: Any) -> None:
    """An httpx client (always), a redis.asyncio client (with Redis) and a SQLAlchemy async
    engine (with PostgreSQL), each a per_loop value, each seen from its server: one
    connection while the loop serves, none once the loop has ended, from a retired loop
    while the worker lives on as from the last loop at warm shutdown."""
    pytest.importorskip("httpx", reason="httpx is not installed: pip install httpx to run this")
    server = counting_http_server
    with contextlib.ExitStack() as stack:
        counters: dict[str, Any] = {"http": lambda: set(server.open)}
        if REDIS_URL:
            import redis

            inspector = stack.enter_context(redis.Redis.from_url(REDIS_URL))
            counters["redis"] = lambda: {int(client["id"]) for client in inspector.client_list()
                                         if client["name"] == CLIENTS_NAME}
        if POSTGRES_URL:
            counters["postgres"] = _postgres_backends

        def open_now() -> dict[str, set[int]]:
            return {kind: count() for kind, count in counters.items()}

        def none_open() -> bool:
            return not any(open_now().values())

        env = {"RELIER_CLIENTS_HTTP_URL": f"http://127.0.0.1:{server.server_port}",
               "RELIER_CLIENTS_HOLD_EXIT": "1",
               "PYTHONWARNINGS": "default::ResourceWarning"}  # a client closed by GC says so
        with running_worker("clients", "solo", 1, env=env) as worker:
            pid = worker.process.pid
            try:
                assert none_open()
                first = [get(worker.send(use_real_clients)) for _ in range(3)]
                assert first[1:] == first[:1] * 2, "one loop, and one connection of each, reused"
                old = first[0]
                assert open_now() == {kind: {old[kind]} for kind in counters}

                # Retire the loop: its thread is held by time.sleep(3) past hard_timeout=1.
                start = len(worker.lines)
                with pytest.raises(HardTimeout):
                    get(worker.send(blocks_its_loop_for, 3))
                worker.wait_for("blocked its event loop", timeout=10, start=start)
                # Once its blocking call returns, the old loop closes its values, on its own.
                _poll(none_open, 20, "the retired loop closes its connections",
                      lambda: f"open: {open_now()}; log:\n" + "\n".join(worker.lines[start:]))
                worker.wait_for(f"per_loop values closed on loop {old['loop']}", 10, start)

                second = [get(worker.send(use_real_clients)) for _ in range(3)]
                assert second[1:] == second[:1] * 2
                new = second[0]
                assert new["loop"] != old["loop"], "a fresh loop replaced the retired one"
                assert all(new[kind] != old[kind] for kind in counters), "new connections"
                assert open_now() == {kind: {new[kind]} for kind in counters}, "one each, never 2"

                # Warm shutdown closes the last loop's values: seen while the process still lives.
                start = len(worker.lines)
                worker.process.send_signal(signal.SIGTERM)
                _poll(lambda: marked(f"clients-held-{pid}") is not None
                      or worker.process.poll() is not None, 30, "warm shutdown ends the loop")
                assert worker.process.poll() is None, "exited before the hold:\n" + worker.log
                _poll(none_open, 10, "warm shutdown closes the connections",
                      lambda: f"open: {open_now()}")
                worker.wait_for(f"per_loop values closed on loop {new['loop']}", 5, start)
            finally:
                mark(f"clients-release-{pid}")  # no failed check may hold its exit
            assert worker.process.wait(30) == 0
            log_text = _whole_log(worker)
        assert none_open()
    assert (server.opened, server.peak) == (2, 1), "two HTTP connections, one at a time"
    # Celery logs the expected HardTimeout with its traceback: judge the rest of the log.
    lines = log_text.splitlines()
    begin = next(i for i, line in enumerate(lines) if "raised unexpected: HardTimeout" in line)
    end = next(i for i in range(begin, len(lines)) if "HardTimeout: task " in lines[i])
    log_text = "\n".join(lines[:begin] + lines[end + 1:])
    for bad in ("Unclosed", "unclosed", "Event loop is closed", "was never awaited",
                "Task was destroyed", "Traceback"):
        assert bad not in log_text, f"{bad!r} in the worker's log:\n{log_text}"


# ---------------------------------------------------------------------------------------
# Django: the async ORM in a bridged task runs on the thread that waits for the task (the
# worker thread, the caller's), as under async_to_sync, where Celery's Django fixup looks
# after its connections. Each drill runs a bridged task beside the usual way, a sync task
# calling async_to_sync(body)(). Settings are configured in code; the workers get Celery's
# fixup from DJANGO_SETTINGS_MODULE (naming this module) and set Django up at import.
# ---------------------------------------------------------------------------------------
DJANGO_LABEL = os.environ.get("RELIER_DJANGO_LABEL")  # set in the Django workers' environment
DJANGO_APP_LABEL = __name__.rsplit(".", 1)[-1]
DjangoRow: Any = None  # the model, once Django is set up in this process
TASK_THREAD: contextvars.ContextVar[int] = contextvars.ContextVar("task_thread")


@task_prerun.connect
def _note_task_thread(**_: Any) -> None:
    TASK_THREAD.set(threading.get_ident())  # the worker thread: the body's context has it


def _django_database(label: str) -> dict[str, Any]:
    """Django's DATABASES entry for RELIER_POSTGRES_URL (SQLAlchemy style) or the local server."""
    from urllib.parse import unquote, urlsplit

    url = urlsplit(POSTGRES_URL or "postgresql://postgres@127.0.0.1:5432/test")
    return {"ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/") or "postgres",
            "USER": unquote(url.username or ""), "PASSWORD": unquote(url.password or ""),
            "HOST": url.hostname or "127.0.0.1", "PORT": str(url.port or 5432),
            "CONN_MAX_AGE": 0, "OPTIONS": {"application_name": _django_app_name(label)},
            "TEST": {"NAME": f"test_relier_{RUN_ID}"}}


def _django_app_name(label: str) -> str:
    return f"relier-{RUN_ID}-django-{label}"  # how pg_stat_activity tells a worker's connections


def _django_setup(label: str) -> Any:
    """Configure Django in code, set it up, define the one model; return it."""
    global DjangoRow
    if DjangoRow is None:
        import django
        from django.conf import settings
        from django.db import models

        settings.configure(
            DATABASES={"default": _django_database(label)}, INSTALLED_APPS=[__name__],
            MIGRATION_MODULES={DJANGO_APP_LABEL: None}, LOGGING_CONFIG=None, USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField", SECRET_KEY="relier")
        django.setup()

        class Row(models.Model):
            name = models.CharField(max_length=100)

            class Meta:
                app_label = DJANGO_APP_LABEL
                db_table = f"relier_{RUN_ID}_row"

        DjangoRow = Row
    return DjangoRow


def _sleep_query(seconds: float) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


def _backend_and_thread() -> tuple[int, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0], threading.get_ident()


async def _django_body(key: str, query_seconds: float) -> dict[str, Any]:
    """A task body using the async ORM: what it saw, on which connection and thread."""
    from asgiref.sync import sync_to_async

    started = time.monotonic()
    row = await DjangoRow.objects.acreate(name=key)
    if query_seconds:
        mark(f"django-query-{key}")
        await sync_to_async(_sleep_query)(query_seconds)  # thread-sensitive, as the ORM's
    count = await DjangoRow.objects.filter(name=key).acount()
    await DjangoRow.objects.filter(pk=row.pk).aupdate(name=key)
    backend, orm_thread = await sync_to_async(_backend_and_thread)()
    return {"pid": os.getpid(), "backend": backend, "orm_thread": orm_thread, "count": count,
            "task_thread": TASK_THREAD.get(None), "elapsed": time.monotonic() - started}


@bridged_task(app=app)
async def django_bridged(key: str, query_seconds: float = 0.0) -> dict[str, Any]:
    return await _django_body(key, query_seconds)


@app.task
def django_baseline(key: str, query_seconds: float = 0.0) -> dict[str, Any]:
    from asgiref.sync import async_to_sync

    return async_to_sync(_django_body)(key, query_seconds)


@bridged_task(app=app, hard_timeout=1)
async def django_bridged_timed_out(key: str) -> dict[str, Any]:
    return await _django_body(key, 2.5)


async def _django_body_within_a_second(key: str) -> dict[str, Any]:
    return await asyncio.wait_for(_django_body(key, 2.5), 1)


@app.task
def django_baseline_timed_out(key: str) -> dict[str, Any]:
    from asgiref.sync import async_to_sync

    return async_to_sync(_django_body_within_a_second)(key)


DJANGO_TASKS = (django_bridged, django_baseline)


def _django_missing() -> Optional[str]:
    """Why the Django drills cannot run here, if they cannot."""
    if importlib.util.find_spec("django") is None:
        return "needs Django: pip install django 'psycopg[binary]' to run this"
    if not any(importlib.util.find_spec(name) for name in ("psycopg", "psycopg2")):
        return "needs a PostgreSQL driver for Django: pip install 'psycopg[binary]' to run this"
    database = _django_database("probe")
    try:
        socket.create_connection((database["HOST"], int(database["PORT"])), timeout=3).close()
    except OSError as exc:
        return (f"needs PostgreSQL at {database['HOST']}:{database['PORT']} ({exc}): set "
                "RELIER_POSTGRES_URL=postgresql://user@host:port/db to run this")
    return None


def _django_sql(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _django_connections(label: str) -> int:
    return int(_django_sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           _django_app_name(label))[0][0])


@pytest.fixture(scope="session")
def django_rows() -> Iterator[Any]:
    """Django set up in this process, and the model's table for the workers."""
    missing = _django_missing()
    if missing:
        pytest.skip(missing)
    row = _django_setup("pytest")
    from django.db import connection

    with connection.schema_editor() as editor:
        editor.create_model(row)
    try:
        yield row
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(row)
        connection.close()


@pytest.fixture(scope="module", params=["prefork", "threads", "solo"])
def django_worker(request: Any, django_rows: Any) -> Iterator[Worker]:
    pool = request.param
    env = {"DJANGO_SETTINGS_MODULE": MODULE, "RELIER_DJANGO_LABEL": pool}
    with running_worker(f"django-{pool}", pool, {"threads": 8, "prefork": 2}.get(pool, 1),
                        env=env) as worker:
        yield worker


def _label(worker: Worker) -> str:
    return worker.name.split("-", 1)[1]  # django-<pool>


def test_django_connections_are_the_worker_threads_as_with_async_to_sync(
        django_worker: Worker) -> None:
    """CONN_MAX_AGE=0: each task connects afresh, on the worker thread, and Celery's fixup
    closes the connection after it, so none is left open between tasks."""
    for task in DJANGO_TASKS:
        key = f"conn-{task.__name__}-{uuid.uuid4().hex[:6]}"
        replies = [get(r) for r in [django_worker.send(task, f"{key}-{i}") for i in range(6)]]
        assert [reply["count"] for reply in replies] == [1] * 6
        assert all(reply["orm_thread"] == reply["task_thread"] for reply in replies), (
            f"{task.__name__}: the ORM ran off the worker thread: {replies}")
        backends = {(reply["pid"], reply["backend"]) for reply in replies}
        assert len(backends) == 6, f"{task.__name__}: a connection per task: {replies}"
        _poll(lambda: _django_connections(_label(django_worker)) == 0, 15,
              f"{task.__name__}: the fixup closes every connection after its task",
              lambda: f"{_django_connections(_label(django_worker))} open")


def test_django_orm_recovers_after_the_server_drops_the_connections(
        django_worker: Worker) -> None:
    """pg_terminate_backend of every connection the worker holds: the next tasks succeed."""
    warm = [django_worker.send(task, f"warm-{i}") for task in DJANGO_TASKS for i in range(4)]
    for result in warm:
        get(result)
    _django_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s", _django_app_name(_label(django_worker)))
    after = {task.__name__: [django_worker.send(task, f"after-{i}") for i in range(6)]
             for task in DJANGO_TASKS}
    failed = {name: [repr(r.result) for r in results
                     if not r.wait(timeout=30, interval=0.05, propagate=False) or r.failed()]
              for name, results in after.items()}
    assert failed == {"django_bridged": [], "django_baseline": []}


@pytest.mark.parametrize("django_worker", ["threads"], indirect=True)
def test_django_a_slow_query_holds_no_other_tasks_orm_calls(django_worker: Worker) -> None:
    """threads -c 8: one task in a 2.5 s query, 7 quick ORM tasks beside it."""
    for task in DJANGO_TASKS:
        key = f"slow-{task.__name__}-{uuid.uuid4().hex[:6]}"
        slow = django_worker.send(task, key, 2.5)
        _poll(lambda key=key: marked(f"django-query-{key}") is not None, 30,
              "the slow query starts")
        quick = [get(r)["elapsed"] for r in
                 [django_worker.send(task, f"{key}-quick-{i}") for i in range(7)]]
        assert max(quick) < 1.0, f"{task.__name__}: quick ORM tasks held: {quick}"
        assert not slow.ready(), "the quick tasks ran beside the slow query"
        assert get(slow)["count"] == 1


@pytest.mark.parametrize("django_worker", ["solo"], indirect=True)
def test_django_a_timed_out_tasks_query_holds_no_later_task(django_worker: Worker) -> None:
    """A task timed out at 1 s in a 2.5 s query (hard_timeout; asyncio.wait_for under
    async_to_sync): the process's next task finds the ORM free."""
    for timed_out, task in ((django_bridged_timed_out, django_bridged),
                            (django_baseline_timed_out, django_baseline)):
        key = f"timed-out-{task.__name__}-{uuid.uuid4().hex[:6]}"
        sent = time.monotonic()
        first, then = django_worker.send(timed_out, key), django_worker.send(task, f"{key}-next")
        assert first.wait(timeout=30, interval=0.05, propagate=False) is not None
        failed_after = time.monotonic() - sent
        assert first.failed(), f"{timed_out.__name__}: {first.result!r}"
        held = get(then)["elapsed"]
        assert held < 1.0, (f"{task.__name__}: the next task's ORM calls held {held:.2f} s; "
                            f"{timed_out.__name__} failed after {failed_after:.2f} s")


def test_django_testcase_sees_and_rolls_back_a_direct_calls_work(django_rows: Any) -> None:
    """A Django TestCase calling the tasks directly and eagerly: they see the test's rows,
    their writes roll back with the test, and the test database is dropped cleanly."""
    import io
    import unittest

    from django.db import connection
    from django.test import TestCase
    from django.test.utils import setup_databases, teardown_databases

    row = django_rows

    class RowsCase(TestCase):
        def setUp(self) -> None:
            row.objects.create(name="seen")

        def test_1_calls_see_the_tests_rows(self) -> None:
            for count, task in enumerate(DJANGO_TASKS, start=2):  # the test's row, theirs
                reply = task("seen")
                self.assertEqual((reply["count"], reply["orm_thread"]),
                                 (count, threading.get_ident()), task.__name__)
            app.conf.task_always_eager = True
            try:
                self.assertEqual(django_bridged.delay("seen").get()["count"], 4)
            finally:
                app.conf.task_always_eager = False

        def test_2_their_writes_rolled_back(self) -> None:
            self.assertEqual(list(row.objects.values_list("name", flat=True)), ["seen"])

    old_config = setup_databases(verbosity=0, interactive=False)
    try:
        with connection.schema_editor() as editor:  # the module is no models module: syncdb
            editor.create_model(row)                # leaves it out
        report = io.StringIO()
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(RowsCase)
        outcome = unittest.TextTestRunner(stream=report, verbosity=2).run(suite)
        assert outcome.wasSuccessful(), report.getvalue()
    finally:
        teardown_databases(old_config, verbosity=0)  # raises if a connection still uses it


if DJANGO_LABEL and os.environ.get("DJANGO_SETTINGS_MODULE") == MODULE:  # a Django worker
    _django_setup(DJANGO_LABEL)


# ---------------------------------------------------------------------------------------
# The demo: python test_relier_bridge.py
# ---------------------------------------------------------------------------------------
async def demo_checkpoint(ctx: SoftContext) -> None:
    ctx.set_partial({"rows_done": 3})


@bridged_task(app=app, soft_timeout=0.5, hard_timeout=1.5, on_soft=demo_checkpoint)
async def demo_import(rows: int) -> int:
    for _ in range(rows):
        await asyncio.sleep(0.2)
    return rows


def demo() -> None:
    print(f"broker {BROKER_URL}  (data in {DATA_DIR})")
    print("starting a prefork worker (celery -A test_relier_bridge worker -P prefork -c 2)...")
    with running_worker("prefork", "prefork", 2) as worker:
        print("add(2, 3)               ->", get(add.push(2, 3)))
        facts = [get(loop_facts.push()) for _ in range(4)]
        print("bridge loops            ->",
              {fact["pid"]: fact["thread"] for fact in facts}, "(one per child process)")
        print("demo_import(5)          ->", get(demo_import.push(5)),
              "(soft hook ran at 0.5 s, task went on)")
        try:
            get(demo_import.push(20))
        except HardTimeout as error:
            print("demo_import(20)         ->", f"{type(error).__name__}: {error};",
                  "partial =", error.partial)
    print(f"worker stopped (pid {worker.process.pid}, exit code {worker.process.returncode})")
    delete_queues()
    delete_results()
    shutil.rmtree(DATA_DIR, ignore_errors=True)


if __name__ == "__main__":
    # Celery imports this module by name (the result backend, the transport): let it find
    # this very module, not a second copy registering every task again (Celery 5.7 warns).
    sys.modules[MODULE] = sys.modules[__name__]
    demo()
