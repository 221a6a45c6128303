"""Runs user code inside a replica: load the code blob, run setup hooks, invoke, interrupt, capture output.

Sync functions run in a thread pool sized to `max_concurrency`; a call that is cancelled or runs past its time
limit is interrupted by raising `CallInterrupted` inside its thread (CPython's async-exception hook), so it
stops at its next bytecode instead of burning the replica. Async functions are cancelled as tasks. A call that
still runs INTERRUPT_GRACE_S after it had to stop (it swallowed the interrupt, sits in one long C call, or, async,
blocks the event loop) is caught by a `Watchdog` thread, which ends the sandbox process (`on_stuck`); one that
holds the GIL throughout (so no thread of the process runs) by the actor, through the watchdog's `Beacon`.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import inspect
import io
import itertools
import sys
import threading
import time
import traceback
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from cocoon_faas.runtime.beacon import Beacon
from cocoon_faas.spec import FunctionSpec

LOG_LIMIT = 64 * 1024
_current_log: contextvars.ContextVar[CallLog | None] = contextvars.ContextVar("cocoon_call_log", default=None)


# A call still running this long after its interrupt (time limit, cancel, or its client gone; it catches the
# interrupt, sits in one long C call, or blocks the event loop) makes the executor report itself stuck: the sandbox
# child then exits and the gateway replaces the replica, because an ended call must stop using the provider's
# machine, not only lose its answer. The default of COCOON_INTERRUPT_GRACE_S, which the actor passes to its child.
INTERRUPT_GRACE_S = 10.0


def grace_from(value: Any) -> float:
    """The interrupt grace an actor sent its child (COCOON_INTERRUPT_GRACE_S), else the default."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600:
        return float(value)
    return INTERRUPT_GRACE_S


class CallInterrupted(BaseException):
    """Raised inside a user thread to stop a cancelled or timed-out call (BaseException: user code rarely catches it)."""


@dataclass
class CallLog:
    """stdout/stderr written during one call, bounded."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0

    def add(self, stream: str, text: str) -> None:
        if self.size >= LOG_LIMIT or not text:
            return
        text = text[: LOG_LIMIT - self.size]
        self.size += len(text)
        if self.lines and self.lines[-1][0] == stream:
            self.lines[-1] = (stream, self.lines[-1][1] + text)
        else:
            self.lines.append((stream, text))


class _Tee(io.TextIOBase):
    """Replaces sys.stdout/stderr: writes through and also to the current call's log."""

    def __init__(self, stream: str, under: Any) -> None:
        self._stream = stream
        self._under = under

    def write(self, s: str) -> int:
        log = _current_log.get()
        if log is not None:
            log.add(self._stream, s)
        try:
            return self._under.write(s)
        except Exception:
            return len(s)

    def flush(self) -> None:
        try:
            self._under.flush()
        except Exception:
            pass

    def isatty(self) -> bool:
        return False


def install_output_capture() -> None:
    if not isinstance(sys.stdout, _Tee):
        sys.stdout = _Tee("stdout", sys.stdout)
        sys.stderr = _Tee("stderr", sys.stderr)


def _interrupt_thread(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(CallInterrupted))


class _Watched:
    __slots__ = ("stop_by", "task")

    def __init__(self, stop_by: float, task: asyncio.Task[Any] | None) -> None:
        self.stop_by, self.task = stop_by, task


class Watchdog:
    """Reports stuck (`on_stuck`) when a call still runs `grace` seconds after it had to stop: its time limit
    passed, or it was interrupted (cancelled, its client gone). A thread of its own, not a timer on the event
    loop: an async function that blocks the loop (`time.sleep` in `async def`, a busy loop) stops every timer on
    it, and one that catches its CancelledError and goes on never tells the loop. A call within its time limit
    and not interrupted is never reported, however busy it keeps the loop (a busy Python loop still lets this
    thread run: the interpreter switches threads every few milliseconds).

    A C call that holds the GIL throughout stops this thread too; for that the watchdog keeps the child's `beacon`
    (runtime/beacon.py) current, and the actor, another process, ends a child whose beacon went stale past its due.

    The calls are a dict that the loop and pool threads change and this thread copies (single dict operations,
    atomic under the GIL): no lock on the call path but the beacon's, taken only when a call starts."""

    def __init__(self, on_stuck: Callable[[], None], grace: float, beacon: Beacon | None = None) -> None:
        self.on_stuck = on_stuck
        self.grace = grace
        self.beacon = beacon
        self._calls: dict[int, _Watched] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._due = 0.0  # what the beacon says (0: nothing watched)
        self._publish = threading.Lock()

    def watch(self, stop_by: float, task: asyncio.Task[Any] | None = None) -> int:
        """Watch a running call that must stop by `stop_by` (time.monotonic()); an unconsumed cancellation of
        its asyncio `task` (Python 3.11+: `Task.cancelling()`) moves that to when it is first seen. Returns the
        token to pass to `done` when the call's code has returned."""
        token = next(self._ids)
        self._calls[token] = _Watched(stop_by, task)
        if self.beacon is not None:
            due = stop_by + self.grace
            if not 0.0 < self._due <= due:  # the new earliest end: on the page before the call's code runs
                with self._publish:
                    if not 0.0 < self._due <= due:
                        self._due = due
                        self.beacon.set_due(due)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cocoon-watchdog", daemon=True)
            self._thread.start()
        return token

    def done(self, token: int) -> None:
        self._calls.pop(token, None)

    @property
    def watching(self) -> int:
        return len(self._calls)

    def overdue(self, now: float) -> bool:
        """Whether a watched call should have stopped more than `grace` seconds before `now`."""
        for w in list(self._calls.values()):
            if w.task is not None and now < w.stop_by:
                cancelling = getattr(w.task, "cancelling", None)  # a plain int read: safe off the loop's thread
                if cancelling is not None and cancelling():
                    w.stop_by = now
            if now - w.stop_by > self.grace:
                return True
        return False

    def _tick(self) -> None:
        """The beacon's beat and the watched calls' earliest end, recomputed (calls that ended leave it)."""
        if self.beacon is None:
            return
        with self._publish:
            stops = [w.stop_by for w in list(self._calls.values())]
            self._due = min(stops) + self.grace if stops else 0.0
            self.beacon.tick(self._due)

    def _run(self) -> None:
        while True:
            self._tick()
            time.sleep(min(max(self.grace / 20, 0.05), 0.5))
            if self.overdue(time.monotonic()):
                self.on_stuck()
                return


class _Running:
    """The pool thread running one call, interruptible only while it is inside that call.

    An asynchronous exception lands at the thread's next bytecode, wherever that is: sent after the call's code
    returned (its future not yet marked done), it would hit the idle pool thread and kill it, or the next call
    that thread picks up. So the thread says when it enters and leaves, under a lock that `interrupt` holds:
    an interrupt is only ever sent before `leave`, and then it fires inside the call's own frame at the latest
    in `leave`. The call is watched (`watchdog`) from when it enters until it leaves, against its time limit
    (`stop_by`) and, once interrupted, against the interrupt. A call interrupted before a pool thread took it up
    (its time limit passed while it queued) never runs."""

    __slots__ = ("_lock", "_ident", "_left", "_watchdog", "_token", "_stop_by", "_watched")

    def __init__(self, watchdog: Watchdog | None = None, stop_by: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._ident: int | None = None
        self._left = False
        self._watchdog = watchdog
        self._token = 0
        self._stop_by = stop_by
        self._watched = 0

    def enter(self) -> None:
        with self._lock:
            if self._left:
                raise CallInterrupted("timeout")
            self._ident = threading.get_ident()
            if self._watchdog is not None and self._stop_by:
                self._watched = self._watchdog.watch(self._stop_by)

    def leave(self) -> None:
        with self._lock:
            self._left = True
            if self._watchdog is not None:
                if self._token:
                    self._watchdog.done(self._token)
                if self._watched:
                    self._watchdog.done(self._watched)

    def interrupt(self) -> None:
        with self._lock:
            if self._ident is None:
                self._left = True  # not started: it never will (see `enter`)
            elif not self._left:
                _interrupt_thread(self._ident)
                if self._watchdog is not None:
                    self._token = self._watchdog.watch(time.monotonic())
                self._left = True  # one interrupt per call: a second could land after the first unwound it


def trimmed_traceback(exc: BaseException, limit: int = 8) -> str:
    """The user's frames only (ours are noise), last `limit` of them."""
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "/cocoon_faas/" not in f.filename and "/runtime/" not in f.filename] or list(tb)
    lines = traceback.format_list(frames[-limit:])
    return "Traceback (most recent call last):\n" + "".join(lines) + f"{type(exc).__name__}: {exc}\n"


class LoadedFunction:
    """A deployed function, unpickled and set up inside the replica."""

    def __init__(self, blob: bytes, spec: FunctionSpec) -> None:
        self.spec = spec
        self.on_stuck: Callable[[], None] | None = None  # the sandbox child exits (see INTERRUPT_GRACE_S)
        self.grace = INTERRUPT_GRACE_S  # set before the first call (the child: from its LOAD frame)
        self.beacon: Beacon | None = None  # the page the actor watches (the child: from its command line)
        self._watchdog: Watchdog | None = None
        payload = cloudpickle.loads(blob)
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise RuntimeError("unsupported code blob format; redeploy with this version of cocoon-faas")
        self._payload = payload
        self.target: Callable[..., Any] | None = None
        self.pool = ThreadPoolExecutor(max_workers=max(1, spec.max_concurrency), thread_name_prefix="cocoon-call")
        self._batcher: Batcher | None = None

    def setup(self) -> CallLog:
        """Instantiate the class and run its enter hooks (once per replica); returns what they printed."""
        log = CallLog()
        token = _current_log.set(log)
        try:
            p = self._payload
            if p["kind"] == "method":
                obj = p["cls"]()
                for hook in p.get("enter", ()):
                    getattr(obj, hook)()
                self.target = getattr(obj, p["method"])
            else:
                self.target = p["fn"]
        finally:
            _current_log.reset(token)
        if self.spec.batch is not None:
            self._batcher = Batcher(self, self.spec.batch.max_batch_size, self.spec.batch.wait_ms / 1000)
        return log

    # -- invocation -------------------------------------------------------------------------------

    async def run(self, kwargs: dict[str, Any], log: CallLog, timeout: float) -> Any:
        """Run a non-streaming call; raises CallInterrupted on timeout/cancel, the user's exception otherwise."""
        if self._batcher is not None:
            return await asyncio.wait_for(self._batcher.submit(kwargs, log), timeout)
        fn = self.target
        assert fn is not None
        if self.spec.kind == "async":
            return await self._in_task(fn, kwargs, log, timeout)
        return await self._in_thread(lambda: fn(**kwargs), log, timeout)

    def _dog(self) -> Watchdog | None:
        """The watchdog, once there is someone to tell (`on_stuck`: only in the sandbox child)."""
        if self._watchdog is None and self.on_stuck is not None:
            self._watchdog = Watchdog(self.on_stuck, self.grace, self.beacon)
        return self._watchdog

    async def _in_task(self, fn: Callable[..., Any], kwargs: dict[str, Any], log: CallLog, timeout: float) -> Any:
        """Await an async function in the calling task (each call already has its own task and context): no
        second task and no wait_for; a timer cancels this task when the time limit passes, and the watchdog
        ends the process if the call goes on anyway (caught the cancellation, or blocks the loop)."""
        task = asyncio.current_task()
        assert task is not None
        expired = False
        dog = self._dog()
        watched = dog.watch(time.monotonic() + timeout, task) if dog is not None else 0

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        token = _current_log.set(log)
        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            return await fn(**kwargs)
        except asyncio.CancelledError:
            if expired:
                if hasattr(task, "uncancel"):  # 3.11+: this cancellation is consumed here
                    task.uncancel()
                raise CallInterrupted("timeout") from None
            raise
        finally:
            timer.cancel()
            _current_log.reset(token)
            if dog is not None:
                dog.done(watched)

    async def _in_thread(self, work: Callable[[], Any], log: CallLog, timeout: float) -> Any:
        """Run `work` in the pool; a timer (not wait_for/shield: two tasks per call) enforces the limit."""
        loop = asyncio.get_running_loop()
        running = _Running(self._dog(), time.monotonic() + timeout)

        def runner() -> Any:
            running.enter()
            token = _current_log.set(log)
            try:
                return work()
            finally:
                _current_log.reset(token)
                running.leave()

        # the call's context (its caller tag, replica_context) goes with it into the pool thread
        fut = loop.run_in_executor(self.pool, contextvars.copy_context().run, runner)
        waiter: asyncio.Future[Any] = loop.create_future()

        def done(f: asyncio.Future[Any]) -> None:
            exc = f.exception()  # retrieved even when the waiter already timed out (no "never retrieved")
            if waiter.done():
                return
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(f.result())

        def expire() -> None:
            if not fut.done():
                running.interrupt()
            if not waiter.done():
                waiter.set_exception(CallInterrupted("timeout"))

        fut.add_done_callback(done)
        timer = loop.call_later(timeout, expire)
        try:
            return await waiter
        except asyncio.CancelledError:  # the caller cancelled or left, or the gateway ended it at its time limit
            if not fut.done():
                running.interrupt()
            raise
        finally:
            timer.cancel()

    async def stream(self, kwargs: dict[str, Any], log: CallLog, deadline: float) -> AsyncGenerator[Any, None]:
        """Yield a generator function's items as they are produced."""
        fn = self.target
        assert fn is not None
        if self.spec.kind == "asyncgen":
            token = _current_log.set(log)
            dog = self._dog()
            watched = dog.watch(deadline, asyncio.current_task()) if dog is not None else 0
            try:
                agen = fn(**kwargs)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        await agen.aclose()
                        raise CallInterrupted("timeout")
                    try:
                        item = await asyncio.wait_for(agen.__anext__(), remaining)
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        raise CallInterrupted("timeout") from None
                    yield item
            finally:
                _current_log.reset(token)
                if dog is not None:
                    dog.done(watched)
            return
        loop = asyncio.get_running_loop()
        # Read-ahead of a plain generator: small, since a stream waiting for its client's credit stops pulling
        # here and the producer thread then stops this many items ahead (each put waits for the loop anyway)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=8)
        running = _Running(self._dog(), deadline)

        def produce() -> None:
            running.enter()
            token = _current_log.set(log)
            try:
                for item in fn(**kwargs):
                    asyncio.run_coroutine_threadsafe(queue.put(("item", item)), loop).result()
                asyncio.run_coroutine_threadsafe(queue.put(("end", None)), loop).result()
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                _current_log.reset(token)
                running.leave()  # a late interrupt fires here at the latest, inside this call

        fut = loop.run_in_executor(self.pool, contextvars.copy_context().run, produce)
        fut.add_done_callback(lambda f: f.exception())
        finished = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    kind, value = await asyncio.wait_for(queue.get(), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise CallInterrupted("timeout") from None
                if kind == "item":
                    yield value
                elif kind == "end":
                    finished = True
                    return
                else:
                    finished = True
                    raise value
        finally:
            if not finished:  # abandoned (cancelled, timed out, consumer gone): stop the producer
                running.interrupt()
                while not queue.empty():  # unblock a producer waiting on a full queue
                    queue.get_nowait()


class Batcher:
    """Gathers concurrent calls into one invocation with lists of arguments (`@cocoon.batched`)."""

    def __init__(self, loaded: LoadedFunction, max_size: int, wait_s: float) -> None:
        self._loaded = loaded
        self._max = max_size
        self._wait = wait_s
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.batches_run = 0

    async def submit(self, kwargs: dict[str, Any], log: CallLog) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((kwargs, fut))
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._wait, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [(k, f) for k, f in self._pending if not f.done()]
        self._pending = []
        if batch:
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        fn = self._loaded.target
        assert fn is not None
        names = list(inspect.signature(fn).parameters)
        columns = {n: [k.get(n) for k, _ in batch] for n in names if any(n in k for k, _ in batch)}
        self.batches_run += 1
        # a batch is not interrupted (other calls share it), but one running on past the time limit (an async one
        # blocking the loop, a sync one in a C call) ends the process like any call that goes on after its end
        dog = self._loaded._dog()
        watched = dog.watch(time.monotonic() + self._loaded.spec.timeout) if dog is not None else 0
        try:
            if inspect.iscoroutinefunction(fn):
                out = await fn(**columns)
            else:
                out = await asyncio.get_running_loop().run_in_executor(self._loaded.pool, lambda: fn(**columns))
            out = list(out)
            if len(out) != len(batch):
                raise ValueError(f"batched function returned {len(out)} results for {len(batch)} inputs")
            for (_, f), r in zip(batch, out, strict=True):
                if not f.done():
                    f.set_result(r)
        except Exception as exc:  # noqa: BLE001 - every caller in the batch sees the user's error
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
        finally:
            if dog is not None:
                dog.done(watched)
