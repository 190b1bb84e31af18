# relier_bridge: async def Celery tasks that are correct inside real Celery workers.
# Copyright (c) 2026 the relier_bridge authors. MIT licence: use, copy, modify and
# distribute freely, keeping this notice; provided "as is", without warranty of any kind.
# Full text: https://opensource.org/licenses/MIT
"""Run ``async def`` Celery tasks on one persistent event loop per worker process.

Inside a worker every coroutine runs on the process's *bridge loop*: an event loop
created in that process and driven by a daemon thread, so async clients cached per
process stay valid from task to task. The worker thread hands each coroutine over
and blocks until it settles. Outside a worker (a direct call, eager mode) each call
gets a *disposable loop* that is shut down completely before the call returns.
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
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Optional, TypeVar, Union, overload

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
if TYPE_CHECKING:
    TaskBody = Union[Callable[P, Awaitable[R]], Callable[P, R]]
logger = logging.getLogger("relier_bridge")

# How long past hard_timeout a cancelled coroutine may take to finish its finally blocks.
CANCEL_GRACE = 1.0


class HardTimeout(TimeLimitExceeded):  # type: ignore[misc]
    """The coroutine ran past ``hard_timeout`` and was cancelled.

    ``partial`` is the last value the soft-timeout hook passed to ``set_partial``. All
    state lives in ``args`` so the exception survives a trip through a result backend.
    """

    def __init__(self, task_name: str, limit: float, partial: Any = None) -> None:
        super().__init__(task_name, limit, partial)
        self.task_name, self.limit, self.partial = task_name, limit, partial

    def __str__(self) -> str:
        return f"task {self.task_name} exceeded hard_timeout={self.limit}s and was cancelled"


class SoftContext:
    """What the ``on_soft`` hook sees of the running task, and where it leaves a partial result."""

    __slots__ = ("task_id", "name", "args", "kwargs", "partial")

    def __init__(self, task_id: Optional[str], name: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
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

    __slots__ = ("coro", "context", "limits", "name", "soft", "owner", "task", "timers",
                 "hook", "cancel_sent", "settled")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context,
                 limits: _Limits, name: str, soft: Optional[SoftContext]) -> None:
        self.coro, self.context, self.limits, self.name, self.soft = (
            coro, context, limits, name, soft)
        self.owner: Optional[_LoopThread] = None
        self.task: Optional[asyncio.Task[Any]] = None
        self.timers: list[asyncio.TimerHandle] = []
        self.hook: Optional[asyncio.Task[None]] = None
        self.cancel_sent = False  # set on the loop: proves that the loop was still turning
        self.settled = threading.Lock()
        self.settled.acquire()  # released once, by the loop, when the task is done

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
        self.task = owner.loop.create_task(self.coro)
        if self.limits.soft is not None:
            self.timers.append(owner.loop.call_later(self.limits.soft, self._fire_soft))
        if self.limits.hard is not None:
            self.timers.append(owner.loop.call_later(self.limits.hard, self.cancel))
        self.task.add_done_callback(self._finish)

    def cancel(self) -> None:
        self.cancel_sent = True
        if self.task is not None:
            self.task.cancel()

    def _fire_soft(self) -> None:
        self.hook = asyncio.ensure_future(self._soft_hook())

    async def _soft_hook(self) -> None:
        assert self.limits.on_soft is not None and self.soft is not None
        try:
            result = self.limits.on_soft(self.soft)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_soft hook of %s raised; the task goes on", self.name)

    def _finish(self, _: asyncio.Task[Any]) -> None:
        for timer in self.timers:
            timer.cancel()
        if self.hook is not None:
            self.hook.cancel()  # the hook serves a running task only
        self.settled.release()

    def wait(self) -> Any:
        """Block the calling thread until the task is done; return or raise its outcome.

        With ``hard_timeout`` the wait ends at the limit plus ``CANCEL_GRACE`` even if the
        coroutine ignores cancellation or blocks its loop. An exception raised into this
        thread while it waits (Celery's soft time limit, an interrupt) cancels the coroutine.
        """
        hard, owner = self.limits.hard, self.owner
        assert owner is not None
        try:
            settled = self.settled.acquire(timeout=-1 if hard is None else hard + CANCEL_GRACE)
        except BaseException:
            if not owner.loop.is_closed():
                owner.loop.call_soon_threadsafe(self.cancel)
            raise
        if not settled:
            if self.cancel_sent:
                logger.warning("task %s ignored cancellation at hard_timeout=%ss; it is left "
                               "running on the loop", self.name, hard)
            else:
                logger.warning("task %s blocked its event loop past hard_timeout=%ss; that "
                               "loop is retired, the next task gets a fresh one", self.name, hard)
                owner.retire()
        if (self.cancel_sent or not settled) and hard is not None:
            raise HardTimeout(self.name, hard, self.soft.partial if self.soft else None)
        assert self.task is not None
        error = asyncio.CancelledError() if self.task.cancelled() else self.task.exception()
        if error is None:
            return self.task.result()
        if isinstance(error, Exception):
            raise error
        # Celery's tracer lets SystemExit and the like escape, and no result is ever stored:
        # a silent hang for the caller. Here they fail their own task only.
        raise RuntimeError(f"task {self.name} raised {error!r}") from error


class _LoopThread:
    """An event loop driven by a daemon thread of the process that created it."""

    def __init__(self, name: str, is_bridge: bool) -> None:
        _refuse_green_threads()
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


def _refuse_green_threads() -> None:
    # Under monkey-patching a "thread" is a greenlet on the worker's own hub: the worker
    # would block the very hub that must drive the loop.
    gevent, eventlet = sys.modules.get("gevent.monkey"), sys.modules.get("eventlet.patcher")
    if (gevent is not None and gevent.is_module_patched("threading")) or (
            eventlet is not None and eventlet.is_monkey_patched("thread")):
        raise RuntimeError("relier_bridge needs real threads, but gevent or eventlet has "
                           "monkey-patched them: run async tasks in a prefork, solo or "
                           "threads worker")


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` as asyncio.run does: cancel tasks, shut down generators and executor."""
    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_GRACE))
            for task in stuck:
                logger.warning("%r ignored cancellation at loop shutdown", task)
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
    soft = SoftContext(request.id, task.name, args, kwargs) if limits.on_soft else None
    coro = body(task, *args, **kwargs) if bound else body(*args, **kwargs)
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
        if value is None:
            continue
        if not is_async:
            raise ValueError(f"{label} on sync task {fn.__qualname__}: a running thread "
                             "cannot be cancelled; make it `async def`, or use Celery's "
                             "soft_time_limit/time_limit")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(f"soft_timeout ({soft}) must be less than hard_timeout ({hard})")
    if on_soft is not None and soft is None:
        raise ValueError("on_soft is called at soft_timeout: set soft_timeout too")
    if on_soft is not None and not callable(on_soft):
        raise TypeError(f"on_soft must be callable, got {on_soft!r}")
    return is_async


@overload
def bridged_task(fn: TaskBody[P, R], /) -> BridgedTask[P, R]: ...
@overload
def bridged_task(*, app: Optional[celery.Celery] = ..., soft_timeout: Optional[float] = ...,
                 hard_timeout: Optional[float] = ...,
                 on_soft: Optional[Callable[[SoftContext], Any]] = ...,
                 **options: Any) -> Callable[[TaskBody[P, R]], BridgedTask[P, R]]: ...
def bridged_task(fn: Any = None, /, *, app: Optional[celery.Celery] = None,
                 soft_timeout: Optional[float] = None, hard_timeout: Optional[float] = None,
                 on_soft: Optional[Callable[[SoftContext], Any]] = None,
                 **options: Any) -> Any:
    """Register ``fn`` (``async def`` or plain ``def``) as a Celery task.

    Without ``app`` the task is shared, as with ``celery.shared_task``. Every other keyword
    goes to ``app.task``. ``soft_timeout`` calls ``on_soft(ctx)`` while the task keeps
    running; ``hard_timeout`` cancels the coroutine and fails the task with HardTimeout.
    """

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
