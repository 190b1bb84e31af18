# relier_bridge. Copyright (c) 2026 the relier_bridge authors. MIT licence
# (https://opensource.org/licenses/MIT): use, copy, modify and distribute freely, keeping
# this notice; provided "as is", without warranty of any kind.
"""Run ``async def`` Celery tasks on one persistent event loop per worker process.

In a worker, coroutines run on the process's *bridge loop*, driven by a daemon thread, so
clients made with ``per_loop`` serve task after task. Outside a worker (direct call, eager
mode) each call gets a *disposable loop*, shut down completely before the call returns.
It hooks into Celery's worker signals, ``os.register_at_fork`` (wired at the end), Celery's
task stack (lineage) and each loop's async generator hooks (closing ``per_loop`` values).
"""
# Celery ships no type hints: a folder that vendors this module needs no mypy config for it.
# mypy: disable-error-code="import-untyped"
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, Optional, Protocol, TypeVar, cast, overload

import celery
from celery import signals
from celery.app import pop_current_task, push_current_task
from celery.app.task import Context
from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult, EagerResult
from celery.utils.functional import head_from_fun
from kombu.asynchronous import get_event_loop as current_hub

if TYPE_CHECKING:
    from typing import ParamSpec
else:  # Python 3.9 has no ParamSpec at run time; only type checkers need the real one.
    ParamSpec = TypeVar

__all__ = ["BridgedResult", "BridgedTask", "HardTimeout", "SoftContext", "bridged_task",
           "close_bridge_loop", "per_loop"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
logger = logging.getLogger("relier_bridge")

# How long a cancelled coroutine, or a per_loop value's close, may take to finish.
CANCEL_GRACE = 1.0

# The process's state: its bridge loop, made on first use, forgotten in a forked child;
_bridge_loop: Optional[_Loop] = None
_bridge_lock = threading.Lock()
_hub_owner: Optional[tuple[int, Any]] = None  # (thread, kombu hub) of a solo worker: _note_hub
_loop_values: dict[asyncio.AbstractEventLoop, _LoopValues] = {}  # until each loop shuts down
# the bridged task running in this context and its request (Celery's stack is per thread)
_current: contextvars.ContextVar[tuple[celery.Task[Any, Any], Any]] = contextvars.ContextVar(
    "relier_current")


# Public types -----------------------------------------------------------------------------
# Without celery-types, Celery's classes are Any to mypy: subclassing them needs the ignores.
class HardTimeout(TimeLimitExceeded):  # type: ignore[misc, unused-ignore]
    """Past ``hard_timeout``: cancelled, or given up as ``held_by`` held its loop; ``partial``
    is on_soft's last ``set_partial``. State is in ``args``: it survives a result backend."""

    def __init__(self, task_name: str, limit: float, partial: Any = None,
                 held_by: Optional[str] = None) -> None:
        super().__init__(task_name, limit, partial, held_by)
        self.task_name = task_name
        self.limit = limit
        self.partial = partial
        self.held_by = held_by

    def __str__(self) -> str:
        if self.held_by is not None:
            return (f"task {self.task_name} was given up at hard_timeout={self.limit}s: "
                    f"{self.held_by} held its event loop")
        return f"task {self.task_name} exceeded hard_timeout={self.limit}s and was cancelled"


@dataclasses.dataclass
class SoftContext:
    """What the ``on_soft`` hook sees of the running task, and where it leaves a partial result."""

    task_id: Optional[str]
    name: str
    args: Any
    kwargs: Any
    partial: Any = None

    def set_partial(self, value: Any) -> None:
        self.partial = value


@dataclasses.dataclass(frozen=True)
class _Limits:
    """The timeout policy of one task, validated once at decoration time."""

    soft: Optional[float]
    hard: Optional[float]
    on_soft: Optional[Callable[[SoftContext], Any]]

    def __post_init__(self) -> None:
        for label, value in (("soft_timeout", self.soft), ("hard_timeout", self.hard)):
            bad = isinstance(value, bool) or not isinstance(value, (int, float))  # nan: below
            if value is not None and (bad or not 0 < value <= threading.TIMEOUT_MAX - CANCEL_GRACE):
                raise ValueError(f"{label} must be a positive, finite number of seconds that a "
                                 f"lock can wait, got {value!r}")
        if self.soft is not None and self.hard is not None and self.soft >= self.hard:
            raise ValueError(f"soft_timeout ({self.soft}) must be less than hard_timeout "
                             f"({self.hard})")
        if self.on_soft is not None and self.soft is None:
            raise ValueError("on_soft is called at soft_timeout: set soft_timeout too")
        if self.on_soft is not None and not callable(self.on_soft):
            raise TypeError(f"on_soft must be callable, got {self.on_soft!r}")


class _SoftCancel(asyncio.CancelledError, SoftTimeLimitExceeded):  # type: ignore[misc, unused-ignore]
    """Celery's soft time limit as a body sees it: a cancel that asyncio and anyio clean up
    after, and the SoftTimeLimitExceeded of a plain task, to catch and recover from."""


def _is_soft_stop(error: BaseException) -> bool:
    """Whether it escaped, bare or grouped (3.11-3.12 TaskGroups group a CancelledError's)."""
    group = getattr(error, "exceptions", None)
    if isinstance(group, tuple) and group:
        return all(_is_soft_stop(leaf) for leaf in group)
    return isinstance(error, _SoftCancel)


# A run and its loop: start, settle, timers, give-up, retirement ---------------------------
class _Run(Executor):
    """One coroutine's trip over an event loop: started there, awaited from another thread."""

    __slots__ = ("coro", "context", "limits", "name", "soft", "started", "cancelled", "given_up",
                 "held_by", "owed", "landing", "task", "timer", "hook", "hub", "outcome", "error",
                 "inbox", "owner")
    owner: _Loop  # the loop it was last handed to: where it starts, or moves on from

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context,
                 limits: _Limits, name: str, soft: Optional[SoftContext]) -> None:
        self.coro = coro
        self.context = context
        self.limits = limits
        self.name = name
        self.soft = soft  # what on_soft sees; made only for tasks with a soft_timeout
        self.started: Optional[float] = None  # on the loop, when the coroutine starts
        self.cancelled = False  # past hard_timeout, or given up by its waiter
        self.given_up = False  # by its waiter, past its limit: its loop may be stuck
        self.held_by: Optional[str] = None  # what held the loop then, if not this run
        # A stop is owed until the Task is cancelled for it, then landing until thrown in.
        self.owed: Optional[asyncio.CancelledError] = None
        self.landing: Optional[asyncio.CancelledError] = None
        self.task: Optional[asyncio.Future[Any]] = None  # the Task, once it steps the body
        self.timer: Optional[asyncio.TimerHandle] = None
        self.hook: Optional[asyncio.Task[None]] = None
        self.hub: Any = None  # kombu's hub, when the waiting thread is the one running it
        self.outcome: Any = None
        self.error: Optional[BaseException] = None
        self.inbox: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()

    def start(self, owner: _Loop) -> None:
        """On ``owner``'s loop: start the coroutine, unless it moved on or was given up."""
        try:
            owner.queued.remove(self)  # whoever takes a run out of the queue owns its start
        except KeyError:
            return
        if self.cancelled:  # given up by its waiter while it moved
            return
        owner.running.add(self)
        self.started = time.monotonic()
        if self.hub is not None:  # solo pool: see _note_hub
            self.hub.call_soon(lambda: None)
        if sys.version_info >= (3, 12):  # a body that never suspends settles in this turn
            task = asyncio.Task(self._settle(), loop=owner.loop, name=self.name,
                                eager_start=True)
        else:
            task = owner.loop.create_task(self._settle(), name=self.name)
        # One timer at a time, the soft one arming the hard one, and none for a settled run.
        first = self.limits.soft if self.limits.soft is not None else self.limits.hard
        if first is not None and not task.done():
            delay = self.started + first - time.monotonic()  # the first step may have taken long
            self.timer = owner.loop.call_later(delay, self._on_timer)

    async def _settle(self) -> None:
        # Settling inside the task's own step saves the loop turn a done callback costs.
        if self.owner.thread is not None and "asgiref.sync" in sys.modules:  # see submit
            sys.modules["asgiref.sync"].AsyncToSync.executors.current = self  # in this task
        try:
            self.outcome = await self
        except BaseException as exc:  # SystemExit and the like too: they fail this run only
            self.error = exc
        finally:
            if self.timer is not None:
                self.timer.cancel()
            if self.hook is not None:
                self.hook.cancel()  # the hook serves a running task only
            self.owner.finished(self)
            self.inbox.put(None)  # after submit's calls, if any: the waiter returns

    # asgiref's thread-sensitive calls (Django's ORM) run on the AsyncToSync.executors.current
    # _settle sets, as async_to_sync does; unset, one thread serves the process. Read in asgiref
    # 3.2.10 to 3.13.0; before 3.8 it is per asyncio task, unseen by tasks the body creates.
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self.given_up or (self.task is not None and self.task.done()):
            raise RuntimeError(f"task {self.name} is over: its waiting thread runs no more calls")
        future: Future[T] = Future()

        def call() -> None:  # on the waiting thread, in wait()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # SoftTimeLimitExceeded too, as async_to_sync
                    future.set_exception(exc)
        self.inbox.put(call)
        return future

    def __await__(self) -> Generator[Any, Any, Any]:
        """Step the coroutine as its Task would, a stop thrown in as itself (see stop)."""
        self.task = asyncio.current_task()
        sent: Any = None
        thrown: Optional[BaseException] = None
        stop_now = self.owed is not None
        while True:
            if stop_now:  # counted as any cancel, and thrown in instead of the queued step
                self._cancel_owed()
                try:
                    yield from self.owner.loop.create_future()  # cancelled as this step ends
                except asyncio.CancelledError as cancel:
                    thrown = cancel
            if isinstance(thrown, asyncio.CancelledError) and self.landing is not None:
                thrown, self.landing = self.landing, None
            try:
                step = self.coro.send(sent) if thrown is None else self.coro.throw(thrown)
            except StopIteration as stop:
                return stop.value
            try:
                sent, thrown = (yield step), None
            except BaseException as exc:  # what the Task throws in: a cancel, an awaited error
                sent, thrown = None, exc
            # given up while its loop was blocked, it takes no step the loop had queued then
            stop_now = self.cancelled and self.owed is not None

    def _on_timer(self) -> None:
        if self.hook is not None or self.soft is None:  # past hard_timeout
            self.abandon()
            return
        self.hook = asyncio.ensure_future(self._soft_hook(self.soft))
        if self.limits.hard is not None:  # armed by the soft one, as one timer at a time
            delay = self.limits.hard - cast(float, self.limits.soft)
            self.timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    async def _soft_hook(self, soft: SoftContext) -> None:
        logger.warning("task %s passed soft_timeout=%ss", self.name, self.limits.soft)
        try:
            result = self.limits.on_soft(soft) if self.limits.on_soft else None
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_soft hook of %s raised; the task goes on", self.name)

    def stop(self, cancel: asyncio.CancelledError) -> None:
        """From any thread: cancel the body's Task, counted as asyncio counts, and throw
        ``cancel`` in at its ``await``: a CancelledError, or a _SoftCancel at the soft limit."""
        self.owed = cancel
        self.owner.call(self._cancel_owed)

    def _cancel_owed(self) -> None:  # on the loop; a body yet to step takes it at its first
        if self.owed is not None and self.task is not None and not self.task.done():
            self.landing, self.owed = self.owed, None
            self.task.cancel()
        if self.cancelled:  # a retired loop no longer waits for it
            self.owner.finished(self)

    def wait(self) -> Any:
        """Run submitted calls until the run settles; return or raise its outcome. Anything
        raised here but the soft limit gives the run up, as does the limit + CANCEL_GRACE."""
        while True:
            try:
                call = self.inbox.get(timeout=self._left())
                if call is None:
                    break
                call()
            except queue.Empty:
                if self._left() == 0:
                    self._give_up_past_limit()
                    break
            except SoftTimeLimitExceeded as exc:  # raised into this thread by Celery's signal
                self.stop(_SoftCancel(*exc.args))
            except BaseException:
                self.abandon()
                raise
        if self.cancelled and self.limits.hard is not None:
            raise HardTimeout(self.name, self.limits.hard, self.soft and self.soft.partial,
                              self.held_by)
        if self.error is None:
            return self.outcome
        if _is_soft_stop(self.error):
            raise SoftTimeLimitExceeded() from self.error
        if isinstance(self.error, Exception):
            raise self.error
        # Celery's tracer lets SystemExit and the like escape, and no result is ever stored:
        # a silent hang for the caller. Here they fail their own task only.
        raise RuntimeError(f"task {self.name} raised {self.error!r}") from self.error

    def _left(self) -> Optional[float]:
        """Seconds the waiter may still wait: None is for ever; a queued run has all its time."""
        if self.limits.hard is None:
            return None
        start = time.monotonic() if self.started is None else self.started
        return max(start + self.limits.hard + CANCEL_GRACE - time.monotonic(), 0.0)

    def _give_up_past_limit(self) -> None:
        self.given_up = True
        holder = asyncio.current_task(self.owner.loop)
        if holder is not self.task and self.cancelled:
            logger.warning("task %s ignored cancellation at hard_timeout=%ss; it is left "
                           "running on the loop", self.name, self.limits.hard)
        else:  # the cancel never landed: something holds the loop
            if holder is not self.task:
                self.held_by = "a callback" if holder is None else f"task {holder.get_name()}"
            if self.owner.retire():
                logger.warning("%s blocked its event loop past the hard_timeout=%ss of task "
                               "%s; the loop is retired: what started there ends there, the "
                               "rest moves on", self.held_by or f"task {self.name}",
                               self.limits.hard, self.name)
                self.owner.move_queued()
        self.abandon()

    def abandon(self) -> None:
        """Give the run up: unstarted, it never starts; else it takes no step but the cancel."""
        self.cancelled = True  # seen by start, should the run be on its way to another loop
        self.owner.queued.discard(self)
        self.stop(asyncio.CancelledError())


class _LoopState(enum.Enum):
    OPEN = "open"  # takes new runs
    RETIRED = "retired"  # takes none; stops once the runs handed to it are over
    CLOSING = "closing"  # shutting down: what still ends there no longer stops it


class _Loop:
    """An event loop and the runs handed to it. A bridge loop is driven by a daemon thread
    (``thread_name``); a disposable one serves one run, driven by its own or by the caller."""

    def __init__(self, thread_name: Optional[str] = None) -> None:
        # Patched, a "thread" is a greenlet on the hub that the waiting worker would block.
        gevent = sys.modules.get("gevent.monkey")
        eventlet = sys.modules.get("eventlet.patcher")
        if (gevent is not None and gevent.is_module_patched("threading")) or (
                eventlet is not None and eventlet.is_monkey_patched("thread")):
            raise RuntimeError("relier_bridge needs real threads, which gevent or eventlet "
                               "patched: run async tasks in a prefork, solo or threads worker")
        self.loop = asyncio.new_event_loop()
        self.queued: set[_Run] = set()  # handed over, not started
        self.running: set[_Run] = set()  # started, and someone still waits for them
        self.state = _LoopState.OPEN
        self.thread: Optional[threading.Thread] = None
        if thread_name is not None:
            self.thread = threading.Thread(target=self.drive, name=thread_name, daemon=True)
            self.thread.start()

    def serving(self) -> bool:
        return (self.state is _LoopState.OPEN and self.thread is not None
                and self.thread.is_alive())

    def call(self, callback: Callable[..., Any], *args: Any,
             context: Optional[contextvars.Context] = None) -> None:
        """Run ``callback`` on the loop's thread; nothing happens once the loop is closed."""
        with contextlib.suppress(RuntimeError):
            if self.thread is None:  # driven by this very thread, later: no wake-up to send
                self.loop.call_soon(callback, *args, context=context)
            else:
                self.loop.call_soon_threadsafe(callback, *args, context=context)

    def submit(self, run: _Run) -> _Run:
        """Hand ``run`` to this loop, or on to the bridge loop if this one has retired."""
        run.owner = self
        self.queued.add(run)
        if self.state is _LoopState.OPEN:  # a copy each time: two loops may start it at once
            self.call(run.start, self, context=run.context.copy())
        else:  # retired since the caller chose it
            self.move_queued()
        return run

    def move_queued(self) -> None:
        """Hand the runs that have not started here to the current bridge loop."""
        while self.queued:
            with contextlib.suppress(KeyError):  # the loop may take the last one meanwhile
                _bridge().submit(self.queued.pop())

    def retire(self) -> bool:
        """Take no new runs and stop once none is left; True if this call retired it."""
        with _bridge_lock:
            if self.state is not _LoopState.OPEN:
                return False
            self.state = _LoopState.RETIRED
        self.call(self.finished)
        return True

    def finished(self, run: Optional[_Run] = None) -> None:
        """On the loop: ``run`` is over; a retired loop stops once no run is left."""
        if run is not None:
            self.running.discard(run)
        if self.state is _LoopState.RETIRED and not (self.queued or self.running):
            self.loop.stop()

    def drive(self) -> None:
        """Turn the loop until retired and idle, then shut it down as asyncio.run does."""
        loop = self.loop
        own_thread = threading.current_thread() is self.thread
        if own_thread:
            push_current_task(_TASK_OF_CONTEXT)
        try:
            while self.state is _LoopState.OPEN or self.queued or self.running:
                try:
                    loop.run_forever()
                except BaseException as exc:
                    if not own_thread:
                        raise
                    logger.error("%r escaped a coroutine; the bridge loop goes on", exc)
        finally:
            self.state = _LoopState.CLOSING
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_GRACE))
                    if stuck:
                        logger.warning("ignored cancellation at loop shutdown: %r", stuck)
                loop.run_until_complete(loop.shutdown_asyncgens())  # per_loop values too
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                if own_thread:  # a later thread may get this one's id, and its task stack
                    pop_current_task()


# The process's bridge loop, and disposable loops for direct and eager calls ---------------
def _bridge() -> _Loop:
    """Return this process's bridge loop, made on first use, after fork or retirement."""
    global _bridge_loop
    bridge = _bridge_loop
    if bridge is not None and bridge.serving():  # the hot path takes no lock
        return bridge
    with _bridge_lock:
        if _bridge_loop is None or not _bridge_loop.serving():
            _bridge_loop = _Loop(f"relier-bridge-{os.getpid()}")
        return _bridge_loop


def close_bridge_loop(**_: Any) -> None:
    """Shut this process's bridge loop down in order and wait for it (worker shutdown)."""
    bridge = _bridge_loop
    if bridge is not None and bridge.thread is not None and bridge.retire():
        bridge.thread.join(CANCEL_GRACE * 5)


def _forget_bridge_in_child() -> None:
    global _bridge_loop, _hub_owner
    _bridge_loop = None  # the child inherits the loop object, but not the thread driving it
    _hub_owner = None  # nor the hub: it runs in the parent
    _bridge_lock.release()


# Solo pool: the task runs on kombu's hub thread, whose queued ack waits for its next poll,
# up to 10 s (on AMQP the next task waits for it); a call_soon() from another thread ends it.
def _note_hub(**_: Any) -> None:
    global _hub_owner
    hub = current_hub()
    _hub_owner = None if hub is None else (threading.get_ident(), hub)


def _refuse_running_loop(call: str, name: str, instead: str = "task.apush(...)") -> None:
    if asyncio._get_running_loop() is not None:
        raise RuntimeError(f"{call.format(name)} would block the event loop running in this "
                           f"thread, a deadlock if the task needs it: use `await {instead}`")


def _execute(task: celery.Task[Any, Any], body: Callable[..., Coroutine[Any, Any, Any]],
             args: tuple[Any, ...], kwargs: dict[str, Any], limits: _Limits, bound: bool) -> Any:
    """Run one call of an async task body to completion, from synchronous code."""
    request = cast(Any, task)._get_request()  # Celery's: this call's, also when nested in itself
    if not request.is_eager:  # an eager call blocks a running loop as a plain task's would
        _refuse_running_loop("calling {}() synchronously", task.name)
    context = contextvars.copy_context()
    context.run(_current.set, (task, request))
    coro = body(task, *args, **kwargs) if bound else body(*args, **kwargs)
    soft = SoftContext(request.id, task.name, args, kwargs) if limits.soft is not None else None
    run = _Run(coro, context, limits, task.name, soft)
    if not (request.called_directly or request.is_eager):  # executed by a worker
        hub = _hub_owner
        if hub is not None and hub[0] == threading.get_ident():
            run.hub = hub[1]
        return _bridge().submit(run).wait()
    # Driven here as by asyncio.run, or by its own thread: to fail on time, beside a running
    # loop here, or while this thread runs asgiref's calls.
    inline = (limits.hard is None and asyncio._get_running_loop() is None
              and "asgiref.sync" not in sys.modules)
    owner = _Loop(None if inline else f"relier-disposable-{task.name}")
    owner.submit(run)
    owner.retire()
    if owner.thread is None:
        owner.drive()
    try:
        return run.wait()
    finally:
        if owner.thread is not None and not run.given_up:  # given up, it closes once it frees
            owner.thread.join(CANCEL_GRACE * 2)


# per_loop: one value per event loop, closed on it when it shuts down ----------------------
class per_loop(Generic[T]):
    """``await res()``: the running loop's value, made by ``factory()`` (awaited if need be)
    once, for all first users; a failed creation is retried next call. When the loop shuts
    down (see _LoopValues) its values are closed newest first: ``close(value)``, else
    ``value.aclose()`` or ``value.close()``, awaited; a failed or slow close is logged."""

    @overload
    def __init__(self, factory: Callable[[], Awaitable[T]], *,
                 close: Optional[Callable[[T], Any]] = None) -> None: ...
    @overload
    def __init__(self, factory: Callable[[], T], *,
                 close: Optional[Callable[[T], Any]] = None) -> None: ...
    def __init__(self, factory: Callable[[], Any], *,
                 close: Optional[Callable[[T], Any]] = None) -> None:
        if not callable(factory):
            raise TypeError(f"per_loop needs a callable factory, got {factory!r}")
        if close is not None and not callable(close):
            raise TypeError(f"per_loop's close must be callable, got {close!r}")
        self.factory = factory
        self.close = close

    def __call__(self) -> Awaitable[T]:
        loop = asyncio._get_running_loop()
        if loop is None:
            raise RuntimeError("a per_loop value belongs to an event loop: `await res()` from "
                               "a coroutine running on one")
        values = _loop_values[loop] if loop in _loop_values else _LoopValues(loop)
        if self not in values:  # made in a context of no task's, as what it starts outlives them
            values[self] = contextvars.Context().run(loop.create_task, self._make(values))
        return asyncio.shield(values[self])  # a cancelled waiter leaves the creation running

    async def _make(self, values: _LoopValues) -> T:
        try:
            value = self.factory()
            return cast(T, await value if inspect.isawaitable(value) else value)
        except BaseException:
            del values[self]  # the next call tries again
            raise

    async def _close(self, value: T) -> None:
        close = getattr(value, "aclose", None) or getattr(value, "close", None)
        try:
            closing = self.close(value) if self.close else close() if close else None
            if inspect.isawaitable(closing):
                await asyncio.wait_for(closing, CANCEL_GRACE)
        except asyncio.TimeoutError:
            logger.warning("closing %r took over %ss; left as it is", value, CANCEL_GRACE)
        except Exception:
            logger.exception("closing %r raised", value)


class _LoopValues(dict[per_loop[Any], asyncio.Task[Any]]):
    """One loop's per_loop values (the tasks that make them), oldest first, closed when the
    loop shuts its async generators down (asyncio.run, Runner, uvicorn and ours all do)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        _loop_values[loop] = self
        self.closer = self._close_at_shutdown(loop)
        with contextlib.suppress(StopIteration):  # started here, it registers with the loop
            self.closer.asend(None).send(None)

    async def _close_at_shutdown(
            self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            del _loop_values[loop]
            for res, made in reversed(list(self.items())):
                if made.done() and not made.cancelled() and made.exception() is None:
                    await res._close(made.result())


# Results: aget ----------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _ResultWatch:
    """The results of one backend awaited on one loop (``aget`` adds and removes waiters)."""

    backend: Any
    waiters: dict[asyncio.Future[Any], tuple[str, float]] = dataclasses.field(default_factory=dict)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    poller: Optional[asyncio.Task[None]] = None
    failing: bool = False

    async def poll(self) -> None:
        pool = await _threads()
        while self.waiters:
            with contextlib.suppress(asyncio.TimeoutError):  # woken early by a new waiter
                await asyncio.wait_for(self.wake.wait(), min(i for _, i in self.waiters.values()))
            self.wake.clear()
            ids = {task_id for task_id, _ in self.waiters.values()}
            many = self.backend.get_many(ids, interval=0, max_iterations=1)  # a generator
            try:  # one round trip for all (an MGET); a hung one holds this poller, one thread
                ready = await asyncio.wrap_future(pool.submit(dict, many))
                self.failing = False
            except (OSError, *getattr(self.backend, "connection_errors", ())) as exc:
                if not self.failing:  # a blip: each waiter waits until its own timeout
                    logger.warning("result backend unreachable, retrying: %r", exc)
                self.failing = True
                ready = {}
            except Exception as exc:  # anything else ends the waits: it never hangs them
                ready = dict.fromkeys(ids, exc)
            for future, (task_id, _) in self.waiters.items():
                if task_id in ready and not future.done():
                    future.set_result(ready[task_id])


_result_watches: per_loop[dict[Any, _ResultWatch]] = per_loop(dict)
# Per loop, the bridge's own threads for its blocking calls: never behind the default executor.
_threads = per_loop(lambda: ThreadPoolExecutor(thread_name_prefix="relier-io"),
                   close=lambda pool: pool.shutdown(wait=False))


class BridgedResult(AsyncResult, Generic[R]):  # type: ignore[misc, type-arg, unused-ignore]
    """A Celery AsyncResult that async code can await: ``await result.aget()``."""

    async def aget(self, timeout: Optional[float] = None, *, interval: float = 0.02,
                   propagate: bool = True, disable_sync_subtasks: bool = True) -> R:
        """What ``get()`` returns, raises or refuses, awaited holding no thread: read at once,
        then each smallest ``interval`` of the loop's waits; past ``timeout``, TimeoutError."""
        celery_result = cast(Any, self)  # Celery's own, private cache of a finished result
        if celery_result._cache is None:
            if disable_sync_subtasks:
                celery.result.assert_will_not_block()  # type: ignore[attr-defined, unused-ignore]
            if not isinstance(self.backend, BaseKeyValueStoreBackend):
                raise RuntimeError(f"aget needs a key-value result backend, not {self.backend!r}")
            watch = (await _result_watches()).setdefault(self.backend, _ResultWatch(self.backend))
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            watch.waiters[future] = (self.id, interval)
            watch.wake.set()  # a first look-up at once
            if watch.poller is None or watch.poller.done():
                watch.poller = asyncio.ensure_future(watch.poll())
            try:
                meta = await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                raise ResultTimeout(f"task {self.id}: no result within {timeout} s") from None
            finally:
                del watch.waiters[future]
                if not watch.waiters:  # the poller ends as the last waiter leaves
                    watch.wake.set()
            if isinstance(meta, Exception):
                raise meta
            celery_result._maybe_set_cache(dict(meta))  # a copy, which get() then reads
        return cast(R, self.get(propagate=propagate, disable_sync_subtasks=False))

    def get(self, *args: Any, **kwargs: Any) -> Any:  # refused where it would block a loop
        if not (cast(Any, self)._cache or self.ignored):
            _refuse_running_loop("waiting for {} with get()", f"task {self.id}", "result.aget()")
        return super().get(*args, **kwargs)
    wait = get  # as Celery aliases it

    @property
    def supports_native_join(self) -> bool:  # else ResultSet.get() waits by each one's get()
        return asyncio._get_running_loop() is None and bool(self.backend.supports_native_join)


class _EagerResult(EagerResult, BridgedResult[Any]):  # type: ignore[misc, type-arg, unused-ignore]
    """An eager result, awaitable like the others: its aget returns at once."""


# Lineage: Celery's current task, on the threads that run bridged coroutines ---------------
class _TaskOfContext:
    """On the task stack of the bridge's threads, the bridged task of the asking context: so
    tasks it sends get parent, root, priority, a place in its children; current_task is it."""

    def __bool__(self) -> bool:
        return _current.get(None) is not None

    @property
    def request(self) -> Any:
        current = _current.get(None)
        return _NO_REQUEST if current is None else current[1]

    def __getattr__(self, name: str) -> Any:
        current = _current.get(None)
        if current is None:
            raise AttributeError(f"no bridged task runs in this context, so no {name!r}")
        return getattr(current[0], name)


_TASK_OF_CONTEXT: celery.Task[Any, Any] = cast(Any, _TaskOfContext())  # as Celery sees it
_NO_REQUEST = Context()  # called directly: not a task of the worker's, to Celery


# The task class and the decorator ---------------------------------------------------------
class BridgedTask(celery.Task, Generic[P, R]):  # type: ignore[misc, type-arg, unused-ignore]
    """What ``bridged_task`` adds to a Celery task. Celery builds each task class on its app's
    own Task (or ``base=``), and is handed these attributes as options to add to it."""

    def push(self, *args: P.args, **kwargs: P.kwargs) -> BridgedResult[R]:
        """Send the task from synchronous code (``apply_async`` with these arguments)."""
        _refuse_running_loop("{}.push()", self.name)
        return cast(BridgedResult[R], self.apply_async(args, kwargs))

    async def apush(self, *args: P.args, **kwargs: P.kwargs) -> BridgedResult[R]:
        """Send the task from async code; the broker send runs in the bridge's own threads."""
        def send() -> Any:  # there, as this context's task; the thread's stack left as found
            push_current_task(_TASK_OF_CONTEXT)
            try:
                return self.apply_async(args, kwargs)
            finally:
                pop_current_task()
        sent = (await _threads()).submit(contextvars.copy_context().run, send)
        return cast(BridgedResult[R], await asyncio.wrap_future(sent))

    def AsyncResult(self, task_id: str, **kwargs: Any) -> BridgedResult[R]:
        result = super(type(self), self).AsyncResult(task_id, **kwargs)  # the base's, as apply's
        if type(result) is not self.app.AsyncResult:  # a class of the base's own: kept
            return cast(BridgedResult[R], result)
        return BridgedResult(task_id, self.backend, self.name, self.app, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> EagerResult[R]:
        result = super(type(self), self).apply(*args, **kwargs)
        return _EagerResult(*result.__reduce_args__()) if type(result) is EagerResult else result

    @property
    def request(self) -> Any:
        """The request of this task's coroutine running in this context, else Celery's."""
        current = _current.get(None)
        if current is not None and current[0].name == self.name:
            return current[1]
        return cast(Any, self)._get_request()  # Celery's own request property

    if TYPE_CHECKING:
        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...


_TASK_ATTRIBUTES = {name: vars(BridgedTask)[name]
                    for name in ("push", "apush", "AsyncResult", "apply", "request")}


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> BridgedTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> BridgedTask[P, R]: ...


@overload
def bridged_task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> BridgedTask[P, R]: ...
@overload
def bridged_task(fn: Callable[P, R], /) -> BridgedTask[P, R]: ...
@overload
def bridged_task(*, app: Optional[celery.Celery] = ..., soft_timeout: Optional[float] = ...,
                 hard_timeout: Optional[float] = ...,
                 on_soft: Optional[Callable[[SoftContext], Any]] = ...,
                 **options: Any) -> _Decorator: ...
def bridged_task(fn: Any = None, /, *, app: Optional[celery.Celery] = None,
                 soft_timeout: Optional[float] = None, hard_timeout: Optional[float] = None,
                 on_soft: Optional[Callable[[SoftContext], Any]] = None,
                 **options: Any) -> Any:
    """Register ``fn`` (``async def`` or plain ``def``) as a Celery task: shared, as with
    ``celery.shared_task``, unless ``app`` is given; other keywords go to ``app.task``.
    ``soft_timeout`` calls ``on_soft(ctx)`` while the task goes on; ``hard_timeout`` cancels
    the coroutine and fails the task with HardTimeout."""
    limits = _Limits(soft_timeout, hard_timeout, on_soft)
    register = app.task if app is not None else celery.shared_task

    def decorate(body: Any) -> Any:
        generator = inspect.isgeneratorfunction(body) or inspect.isasyncgenfunction(body)
        if not callable(body) or generator:
            raise TypeError(f"bridged_task needs a function that returns its value (a generator "
                            f"must collect its items), got {body!r}")
        if not inspect.iscoroutinefunction(body):
            if soft_timeout is not None or hard_timeout is not None:
                raise ValueError(f"soft_timeout/hard_timeout on sync task {body.__qualname__}: "
                                 "a running thread cannot be cancelled; make it `async def`, "
                                 "or use Celery's soft_time_limit/time_limit")
            return register(**options, **_TASK_ATTRIBUTES)(body)
        bound = bool(options.get("bind"))

        @functools.wraps(body)
        def run(task: celery.Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
            return _execute(task, body, args, kwargs, limits, bound)

        # Celery reads a task's binding from __header__ (errback style, argument checks): it
        # must be the body's, not that of this wrapper, which is always bound to the task.
        header = staticmethod(head_from_fun(body, bound=bound))
        if not bound:  # and pydantic=True binds the arguments to run's signature: the body's
            signature = inspect.signature(body)  # with the task first
            task_first = inspect.Parameter("_task", inspect.Parameter.POSITIONAL_ONLY)
            cast(Any, run).__signature__ = signature.replace(
                parameters=[task_first, *signature.parameters.values()])
        return register(**{**options, **_TASK_ATTRIBUTES, "bind": True, "__header__": header})(run)

    return decorate if fn is None else decorate(fn)


# Wiring into Celery and the interpreter ---------------------------------------------------
signals.worker_ready.connect(_note_hub, weak=False)
signals.worker_process_shutdown.connect(close_bridge_loop, weak=False)
signals.worker_shutdown.connect(close_bridge_loop, weak=False)
# Hold the lock across fork() so that no child inherits it locked by a thread it lacks.
os.register_at_fork(before=_bridge_lock.acquire, after_in_parent=_bridge_lock.release,
                    after_in_child=_forget_bridge_in_child)
