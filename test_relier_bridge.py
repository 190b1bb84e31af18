"""Tests for relier_bridge against real Celery workers.

This file is also the tasks module the workers load (``celery -A test_relier_bridge``)
and the demo (``python test_relier_bridge.py``). It needs only relier_bridge.py beside it.

Configuration, by environment variables alone:
  RELIER_BROKER_URL       broker to test against; default: an embedded, server-less broker
                          (kombu's file-system transport made atomic) in a fresh temp folder
  RELIER_RESULT_BACKEND   result backend; default: files in the same folder for the embedded
                          broker, the broker's own URL for redis://, else rpc://
  RELIER_POSTGRES_URL     e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test, enables the
                          SQLAlchemy async drill (needs sqlalchemy[asyncio] and asyncpg)
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import os
import shutil
import signal
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
from typing import Any, Optional

import celery
import pytest
from celery.backends.filesystem import FilesystemBackend
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.result import AsyncResult
from celery.signals import task_prerun, worker_init
from kombu.exceptions import EncodeError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import ensure_bytes
from kombu.utils.json import dumps

import relier_bridge
from relier_bridge import HardTimeout, SoftContext, bridged_task

HERE = Path(__file__).resolve().parent
MODULE = "test_relier_bridge"  # the name workers import this file under
pytestmark = pytest.mark.timeout(120)  # a hang fails the test; slow tests set their own
# Inherited by the worker subprocesses, so that they and this process share one setup.
RUN_ID = os.environ.setdefault("RELIER_RUN_ID", uuid.uuid4().hex[:8])
DATA_DIR_OWNED = "RELIER_DATA_DIR" not in os.environ
DATA_DIR = Path(os.environ.setdefault("RELIER_DATA_DIR", tempfile.mkdtemp(prefix="relier-")))
BROKER_URL = os.environ.get("RELIER_BROKER_URL", "relierfs://")
EMBEDDED = BROKER_URL == "relierfs://"


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

app = celery.Celery(MODULE, broker=BROKER_URL, backend=_result_backend())
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
)

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
    loop = asyncio.get_running_loop()
    bridge = relier_bridge._bridge_loop
    token = _loop_tokens.setdefault(loop, uuid.uuid4().hex)
    return {"pid": os.getpid(), "loop": token, "thread": threading.current_thread().name,
            "daemon": threading.current_thread().daemon,
            "owner_pid": bridge.pid if bridge is not None and bridge.loop is loop else None,
            "tag": REQUEST_TAG.get(None)}


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


@pytest.fixture(scope="session", autouse=True)
def _data_dir() -> Iterator[None]:
    yield
    relier_bridge.close_bridge_loop()
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


@pytest.mark.slow
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
    threads_before, fds_before = threading.active_count(), _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loops = [leaves_things_open(f"call-{i}") for i in range(10)]
        gc.collect()
    assert len({id(loop) for loop in loops}) == 10, "a fresh loop for every call"
    assert all(loop.is_closed() for loop in loops)
    assert CLOSED_GENERATORS[-10:] == [f"call-{i}" for i in range(10)]
    assert threading.active_count() == threads_before
    assert _open_fds() <= fds_before, "no file descriptor leaked"
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks
    policy = asyncio.get_event_loop_policy()
    assert getattr(policy._local, "_loop", None) is None, "no loop left set on the thread"
    assert relier_bridge._bridge_loop is None or relier_bridge._bridge_loop.retired


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
    first.retired = True
    first.loop.call_soon_threadsafe(first.loop.stop)
    first.thread.join(10)
    first.retired = False  # now only the dead thread gives it away
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    pytest.importorskip(pool)
    with running_worker(pool, pool, 10) as worker:
        result = worker.send(add, 1, 2)
        with pytest.raises(RuntimeError, match="real threads"):
            get(result)
        assert get(worker.send(sync_facts))["pid"] == worker.process.pid


# ---------------------------------------------------------------------------------------
# Real async clients: redis.asyncio per process; SQLAlchemy's async engine made at import.
# ---------------------------------------------------------------------------------------
REDIS_URL = os.environ.get("RELIER_REDIS_URL") or (
    BROKER_URL if BROKER_URL.startswith("redis") else None)
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


@pytest.mark.skipif(not REDIS_URL, reason="needs RELIER_BROKER_URL=redis://... or RELIER_REDIS_URL")
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


@pytest.mark.skipif(not POSTGRES_URL, reason="needs RELIER_POSTGRES_URL")
def test_sqlalchemy_async_engine_made_at_import_serves_forked_children(prefork: Worker) -> None:
    start = len(prefork.lines)
    replies = [get(r, timeout=60) for r in [prefork.send(postgres_query, n) for n in range(50)]]
    assert [reply["value"] for reply in replies] == [n + 1 for n in range(50)]
    for bad in ("different loop", "Event loop is closed"):
        assert bad not in "\n".join(prefork.lines[start:])


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
    print("worker stopped (pid", worker.process.pid, "exit code", worker.process.returncode, ")")
    shutil.rmtree(DATA_DIR, ignore_errors=True)


if __name__ == "__main__":
    # Celery imports this module by name (the result backend, the transport): let it find
    # this very module, not a second copy registering every task again (Celery 5.7 warns).
    sys.modules[MODULE] = sys.modules[__name__]
    demo()
