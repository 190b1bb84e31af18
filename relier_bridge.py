# relier_bridge. Copyright (c) 2026 the relier_bridge authors. MIT licence
# (https://opensource.org/licenses/MIT): use, copy, modify and distribute freely, keeping
# this notice; provided "as is", without warranty of any kind.
"""Run ``async def`` Celery tasks on one persistent event loop per worker process.

In a worker, coroutines run on the process's *bridge loop*: created in that process and
driven by a daemon thread, so async clients cached per process stay valid across tasks.
Outside a worker (direct call, eager mode) each call gets a *disposable loop*, shut down
completely before the call returns.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Optional, Protocol, TypeVar, overload

import celery
from celery.exceptions import TimeLimitExceeded
from celery.result import AsyncResult

if TYPE_CHECKING:
    from typing import ParamSpec
else:  # Python 3.9 has no ParamSpec at run time; only type checkers need the real one.
    ParamSpec = TypeVar

__all__ = ["BridgedTask", "HardTimeout", "SoftContext", "bridged_task", "close_bridge_loop"]

P = ParamSpec("P")
R = TypeVar("R")
logger = logging.getLogger("relier_bridge")

# How long past hard_timeout a cancelled coroutine may take to finish its finally blocks.
CANCEL_GRACE = 1.0


class HardTimeout(TimeLimitExceeded):  # type: ignore[misc]
    """The coroutine ran past ``hard_timeout`` and was cancelled; ``partial`` is the hook's last
    ``set_partial`` value. State lives in ``args``, so it survives a result backend."""

    def __init__(self, task_name: str, limit: float, partial: Any = None) -> None:
        super().__init__(task_name, limit, partial)
        self.task_name, self.limit, self.partial = task_name, limit, partial

    def __str__(self) -> str:
        return f"task {self.task_name} exceeded hard_timeout={self.limit}s and was cancelled"


class SoftContext:
    """What the ``on_soft`` hook sees of the running task, and where it leaves a partial result."""

    __slots__ = ("task_id", "name", "args", "kwargs", "partial")

    def __init__(self, task_id: Optional[str], name: str, args: Any, kwargs: Any) -> None:
        self.task_id, self.name, self.args, self.kwargs = task_id, name, args, kwargs
        self.partial: Any = None

    def set_partial(self, value: Any) -> None:
        self.partial = value


class _Limits(NamedTuple):
    """The timeout policy of one task, validated once at decoration time."""

    soft: Optional[float]
    hard: Optional[float]
    on_soft: Optional[Callable[[SoftContext], Any]]


class _Run:
    """One coroutine's trip over a loop thread: started there, awaited from another thread."""

    __slots__ = ("coro", "context", "limits", "name", "soft", "owner", "task", "timer",
                 "started", "hook", "cancel_sent", "settled", "outcome", "error")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context,
                 limits: _Limits, name: str, soft: SoftContext) -> None:
        self.coro, self.context, self.limits, self.name, self.soft = (
            coro, context, limits, name, soft)
        self.owner: Optional[_LoopThread] = None
        self.task: Optional[asyncio.Task[None]] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.hook: Optional[asyncio.Task[None]] = None
        self.started, self.outcome = 0.0, None
        self.error: Optional[BaseException] = None
        self.cancel_sent = False  # set on the loop: proves that the loop was still turning
        self.settled = threading.Lock()
        self.settled.acquire()  # released once, by the loop, when the outcome is known

    def submit(self, owner: _LoopThread) -> _Run:
        self.owner = owner
        owner.loop.call_soon_threadsafe(self._start, context=self.context)
        return self

    def _start(self) -> None:
        owner = self.owner
        assert owner is not None
        if owner.retired and owner.is_bridge:  # the loop was replaced while this was queued
            self.submit(_bridge())
            return
        # One timer at a time: the soft one arms the hard one. Most runs end before either.
        self.started = owner.loop.time()
        first = self.limits.soft if self.limits.soft is not None else self.limits.hard
        if first is not None:
            self.timer = owner.loop.call_at(self.started + first, self._on_timer)
        if sys.version_info >= (3, 12):  # a body that never suspends settles in this turn
            self.task = asyncio.Task(self._settle(), loop=owner.loop, eager_start=True)
        else:
            self.task = owner.loop.create_task(self._settle())

    async def _settle(self) -> None:
        # Settling inside the task's own step saves the loop turn a done callback costs.
        try:
            self.outcome = await self.coro
        except BaseException as exc:
            self.error = exc
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                raise  # as from any task: out of run_forever, to the loop's driver
        finally:
            if self.timer is not None:
                self.timer.cancel()
            if self.hook is not None:
                self.hook.cancel()  # the hook serves a running task only
            self.settled.release()

    def _on_timer(self) -> None:
        hard, loop = self.limits.hard, asyncio.get_running_loop()
        if self.hook is not None or self.limits.soft is None:  # past hard_timeout
            self.cancel()
            return
        self.hook = loop.create_task(self._soft_hook())
        if hard is not None:
            self.timer = loop.call_at(self.started + hard, self._on_timer)

    def cancel(self) -> None:
        self.cancel_sent = True
        if self.task is not None:
            self.task.cancel()

    async def _soft_hook(self) -> None:
        logger.warning("task %s passed soft_timeout=%ss", self.name, self.limits.soft)
        try:
            result = self.limits.on_soft(self.soft) if self.limits.on_soft else None
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_soft hook of %s raised; the task goes on", self.name)

    def wait(self) -> Any:
        """Block until the run settles and return or raise its outcome; with ``hard_timeout``,
        at most until ``CANCEL_GRACE`` past it. An exception raised into this thread while it
        waits (Celery's soft time limit, an interrupt) cancels the coroutine."""
        hard, owner = self.limits.hard, self.owner
        assert owner is not None
        try:
            settled = self.settled.acquire(timeout=-1 if hard is None else hard + CANCEL_GRACE)
        except BaseException:
            if not owner.loop.is_closed():
                owner.loop.call_soon_threadsafe(self.cancel)
            raise
        if not settled and self.cancel_sent:
            logger.warning("task %s ignored cancellation at hard_timeout=%ss; it is left "
                           "running on the loop", self.name, hard)
        elif not settled:
            logger.warning("task %s blocked its event loop past hard_timeout=%ss; that loop "
                           "is retired, the next task gets a fresh one", self.name, hard)
            owner.retire()
        if (self.cancel_sent or not settled) and hard is not None:
            raise HardTimeout(self.name, hard, self.soft.partial)
        if self.error is None:
            return self.outcome
        if isinstance(self.error, Exception):
            raise self.error
        # Celery's tracer lets SystemExit and the like escape, and no result is ever stored:
        # a silent hang for the caller. Here they fail their own task only.
        raise RuntimeError(f"task {self.name} raised {self.error!r}") from self.error


class _LoopThread:
    """An event loop driven by a daemon thread of the process that created it."""

    def __init__(self, name: str, is_bridge: bool) -> None:
        # Patched, a "thread" is a greenlet on the hub that the waiting worker would block.
        gevent, eventlet = sys.modules.get("gevent.monkey"), sys.modules.get("eventlet.patcher")
        if (gevent is not None and gevent.is_module_patched("threading")) or (
                eventlet is not None and eventlet.is_monkey_patched("thread")):
            raise RuntimeError("relier_bridge needs real threads, which gevent or eventlet "
                               "patched: run async tasks in a prefork, solo or threads worker")
        self.pid, self.is_bridge, self.retired = os.getpid(), is_bridge, False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._drive, name=name, daemon=True)
        self.thread.start()

    def healthy(self) -> bool:
        # After fork() the child inherits this object, but not the thread behind it.
        return self.pid == os.getpid() and not self.retired and self.thread.is_alive()

    def retire(self) -> None:
        """Stop the loop as soon as it is free; it then shuts itself down in order."""
        self.retired = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)

    def _drive(self) -> None:
        while not self.retired:  # only retire() ends the loop; a stray stop() is undone
            try:
                self.loop.run_forever()
            except BaseException as exc:  # SystemExit or KeyboardInterrupt from a coroutine
                logger.error("%r escaped a coroutine on %s; the loop goes on",
                             exc, self.thread.name)
        _shut_down(self.loop)


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` as asyncio.run does: cancel tasks, shut down generators and executor."""
    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_GRACE))
            if stuck:
                logger.warning("ignored cancellation at loop shutdown: %r", stuck)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


_bridge_loop: Optional[_LoopThread] = None
_bridge_lock = threading.Lock()
# Hold the lock across fork() so that no child inherits it locked by a thread it lacks.
os.register_at_fork(before=_bridge_lock.acquire, after_in_parent=_bridge_lock.release,
                    after_in_child=_bridge_lock.release)


def _bridge() -> _LoopThread:
    """Return this process's bridge loop, creating it on first use and after fork or death."""
    global _bridge_loop
    bridge = _bridge_loop
    if bridge is not None and bridge.healthy():
        return bridge
    with _bridge_lock:
        if _bridge_loop is None or not _bridge_loop.healthy():
            _bridge_loop = _LoopThread(f"relier-bridge-{os.getpid()}", is_bridge=True)
        return _bridge_loop


def close_bridge_loop(**_: Any) -> None:
    """Shut this process's bridge loop down in order and wait for it (worker shutdown)."""
    bridge = _bridge_loop
    if bridge is not None and bridge.pid == os.getpid() and bridge.thread.is_alive():
        bridge.retire()
        bridge.thread.join(CANCEL_GRACE * 5)


celery.signals.worker_process_shutdown.connect(close_bridge_loop, weak=False)
celery.signals.worker_shutdown.connect(close_bridge_loop, weak=False)

# The request of the bridged task whose coroutine runs in this context: Celery keeps its
# request stack per thread, and the coroutine runs on another thread than the worker's.
_current_request: contextvars.ContextVar[Any] = contextvars.ContextVar("relier_request")


def _refuse_running_loop(call: str) -> None:
    if asyncio._get_running_loop() is not None:
        raise RuntimeError(f"{call} would block the event loop running in this thread (and "
                           "deadlock if the task needs that loop); from async code use "
                           "`await task.apush(...)`")


def _execute(task: celery.Task, body: Callable[..., Coroutine[Any, Any, Any]],
             args: tuple[Any, ...], kwargs: dict[str, Any], limits: _Limits, bound: bool) -> Any:
    """Run one call of an async task body to completion, from synchronous code."""
    _refuse_running_loop(f"calling {task.name}() synchronously")
    request = task.request
    context = contextvars.copy_context()
    context.run(_current_request.set, request)
    coro = body(task, *args, **kwargs) if bound else body(*args, **kwargs)
    soft = SoftContext(request.id, task.name, args, kwargs)
    run = _Run(coro, context, limits, task.name, soft)
    if not (request.called_directly or request.is_eager):  # executed by a worker
        return run.submit(_bridge()).wait()
    owner = _LoopThread(f"relier-disposable-{task.name}", is_bridge=False)
    try:
        return run.submit(owner).wait()
    finally:
        owner.retire()
        owner.thread.join(CANCEL_GRACE * 2)


class BridgedTask(celery.Task, Generic[P, R]):  # type: ignore[misc]
    """A Celery task whose body may be ``async def``; adds ``push`` and ``apush``."""

    def push(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task from synchronous code (``apply_async`` with these arguments)."""
        _refuse_running_loop(f"{self.name}.push()")
        return self.apply_async(args, kwargs)

    async def apush(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task from async code; the blocking broker send runs in a thread."""
        return await asyncio.to_thread(self.apply_async, args, kwargs)

    def _bridged_request(self) -> Any:
        request = _current_request.get(None)
        if request is not None and getattr(request, "task", self.name) == self.name:
            return request
        return self._get_request()

    request = property(_bridged_request)

    if TYPE_CHECKING:
        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...


def _check(fn: Any, soft: Optional[float], hard: Optional[float], on_soft: Any) -> bool:
    """Validate a task body and its timeouts; return whether the body is async."""
    if not callable(fn):
        raise TypeError(f"bridged_task needs a function, got {fn!r}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(f"{fn.__qualname__} is a generator function: a task must return a "
                        "value, so collect the items and return them")
    is_async = inspect.iscoroutinefunction(fn)
    for label, value in (("soft_timeout", soft), ("hard_timeout", hard)):
        if value is not None and not is_async:
            raise ValueError(f"{label} on sync task {fn.__qualname__}: a running thread "
                             "cannot be cancelled; make it `async def`, or use Celery's "
                             "soft_time_limit/time_limit")
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        if value is not None and bad:
            raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(f"soft_timeout ({soft}) must be less than hard_timeout ({hard})")
    if on_soft is not None and soft is None:
        raise ValueError("on_soft is called at soft_timeout: set soft_timeout too")
    if on_soft is not None and not callable(on_soft):
        raise TypeError(f"on_soft must be callable, got {on_soft!r}")
    return is_async


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

    def decorate(body: Any) -> Any:
        is_async = _check(body, soft_timeout, hard_timeout, on_soft)
        task_options = dict(options)
        base = task_options.pop("base", None) or (app.Task if app is not None else celery.Task)
        if not issubclass(base, BridgedTask):
            base = type(base.__name__, (BridgedTask, base), {"__module__": base.__module__})
        task_options["base"] = base
        register = app.task if app is not None else celery.shared_task
        if not is_async:
            return register(**task_options)(body)
        bound = bool(task_options.get("bind"))
        limits = _Limits(soft_timeout, hard_timeout, on_soft)

        @functools.wraps(body)
        def run(task: celery.Task, *args: Any, **kwargs: Any) -> Any:
            return _execute(task, body, args, kwargs, limits, bound)

        # Celery checks call arguments against this signature; it must show the body's.
        signature = inspect.signature(body)
        if not bound:
            self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
            signature = signature.replace(parameters=[self_param, *signature.parameters.values()])
        run.__signature__ = signature  # type: ignore[attr-defined]
        task_options["bind"] = True
        return register(**task_options)(run)

    return decorate if fn is None else decorate(fn)
