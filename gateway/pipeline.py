"""One call's life, for every entry point: admit, hold, dispatch, meter, settle exactly once, record, metrics.

    call = await pipeline.admit(request, call_id, plan)      # key or payment, body limit, validation, then the hold
    answer, paid = await pipeline.unary(call)                # or pipeline.stream(call) / pipeline.submit(call)

`/fn/{name}` (JSON and sealed), `/v1/calls` and the OpenAI routes only adapt input and output: an entry point turns
the request body into a `Plan` (which function, which bytes go to the replica, which replicas may take them, how
a final frame is checked) and the answer into its response. Everything between is here, once.

Settlement happens exactly once per admitted call, on every path: `Call.finish` charges (success, or the user's own
exception) or releases (platform failure, timeout, cancellation, client gone) and records the call; a second
`finish` returns the first settlement. A stream cut by the client is released, except on a per-token priced
function, which is charged for the items delivered (completion tokens) and the prompt tokens reported so far,
no more. Admission refusals (bad input, payment refused) change nothing and leave no record; every admitted call
leaves exactly one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request

from cocoon_faas import protocol as P
from cocoon_faas.errors import CallCancelledError, CocoonError, InvalidRequestError, OverloadedError
from cocoon_faas.gateway.billing import PAYMENT_HEADER, Billing
from cocoon_faas.gateway.caller_tags import CallerTags
from cocoon_faas.gateway.dispatch import Answer, Replicas, Route, StreamFrames, unary
from cocoon_faas.gateway.http import developer_of, read_body
from cocoon_faas.gateway.metrics import Metrics
from cocoon_faas.gateway.payments import Hold
from cocoon_faas.gateway.replica_client import Frame
from cocoon_faas.gateway.requirements import Requirements
from cocoon_faas.gateway.store import Store
from cocoon_faas.pricing import CHARGE_HEADER, Usage

if TYPE_CHECKING:
    from cocoon_faas.gateway.controller import FunctionRuntime
    from cocoon_faas.gateway.marketplace import Marketplace
    from cocoon_faas.gateway.replica_client import ReplicaHandle

log = logging.getLogger("cocoon.pipeline")


def new_call_id() -> str:
    return os.urandom(16).hex()


CALL_ID_HEADER = "x-cocoon-call-id"
_CALL_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def call_id_of(request: Request) -> str:
    """The client's call id (`X-Cocoon-Call-Id`: resending a call to another gateway is then safe, see
    `Pipeline.admit`), else a fresh one."""
    given = request.headers.get(CALL_ID_HEADER)
    if given is None:
        return new_call_id()
    if not _CALL_ID.fullmatch(given):
        raise InvalidRequestError("X-Cocoon-Call-Id must be 16-64 characters of A-Z a-z 0-9 _ -; send a fresh "
                                  "random id per call (the SDK does) or none")
    return given


class FinalCheck(Protocol):
    """How an entry point vouches for a final frame it cannot read (sealed calls: the replica's receipt)."""

    def observe(self, call: Call, body: bytes, meta: dict[str, Any]) -> None:
        """Every frame a replica sends for this call, as it passes (an audit capture)."""
        ...

    def final(self, call: Call, body: bytes, meta: dict[str, Any], replica: ReplicaHandle | None
              ) -> tuple[float, CocoonError | None]:
        """(metered exec ms, the function's own error if the frame says so); raises CocoonError when the frame
        fails the check (then the call is released, not charged)."""
        ...

    def platform_error(self, err: CocoonError) -> CocoonError:
        """The error a client should see for a platform failure (a sealed replica's ERROR frame)."""
        ...

    def kept(self, body: bytes) -> bytes:
        """What an async call keeps as its result (a sealed call: `{"sealed_frame": base64}`)."""
        ...

    def end_fields(self) -> dict[str, Any]:
        """Fields of a stream's `end` event, from the checked final frame."""
        ...


@dataclass
class Plan:
    """What an entry point made of a request body."""

    fr: FunctionRuntime
    body: bytes
    route: Route = field(default_factory=Route)
    check: FinalCheck | None = None
    units: int = 1  # replica calls this one request makes (an embeddings request: one per input)
    meta: dict[str, Any] = field(default_factory=dict)  # extra call meta for the replica


@dataclass(frozen=True)
class Settlement:
    """How a call ended and what it cost: `charge` None for an unpaid call."""

    status: str
    charge: int | None = None
    receipt: str | None = None
    usage: Usage | None = None
    exec_ms: float = 0.0

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.charge is not None:
            h[CHARGE_HEADER] = str(self.charge)
        if self.receipt is not None:
            h["X-Cocoon-Receipt"] = self.receipt
        return h

    def end_event(self, call_id: str, **extra: Any) -> dict[str, Any]:
        """The fields a stream's final event carries."""
        end: dict[str, Any] = {"call_id": call_id, **extra}
        if self.charge is not None:
            end["charge"] = self.charge
            end["receipt"] = self.receipt
        if self.usage is not None:
            end["usage"] = self.usage.to_json()
        return end


@dataclass
class CallRecord:
    """An async call while the gateway holds it in memory."""

    id: str
    function: str
    version: int
    status: str = "queued"
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None
    charge: int | None = None
    task: asyncio.Task[None] | None = None

    def view(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "function": self.function, "version": self.version,
                             "status": self.status, "created": self.created, "finished": self.finished}
        if self.status == "succeeded" and self.result is not None:
            d["result"] = json.loads(self.result)
        if self.error is not None:
            d["error"] = self.error
        if self.charge is not None:
            d["charge"] = self.charge
        return d


@dataclass(eq=False)
class Call:
    """One admitted call."""

    id: str
    fr: FunctionRuntime
    body: bytes
    caller: str
    hold: Hold | None
    pipeline: Pipeline
    route: Route = field(default_factory=Route)
    check: FinalCheck | None = None
    units: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    settlement: Settlement | None = None
    keep_result: bool = False

    def __post_init__(self) -> None:
        self.meta = {"id": self.id, **self.meta}

    @property
    def per_token(self) -> bool:
        return self.fr.spec.token_prices is not None

    def finish(self, err: CocoonError | None, exec_ms: float, provider: str, usage: Usage | None = None,
               logs: Any = None, result: bytes | None = None, bill: bool | None = None) -> Settlement:
        """Settle and record, exactly once; a second call returns the first settlement. Charged when `bill`
        (default: success or the user's own exception), else the hold is released."""
        if self.settlement is None:
            if bill is None:
                bill = err is None or err.type == "function_error"
            self.settlement = self.pipeline.settle(self, err, exec_ms, provider, usage, logs, result, bill)
        return self.settlement


class Pipeline:
    """The call path every entry point shares."""

    def __init__(self, replicas: Replicas, billing: Billing, store: Store, metrics: Metrics,
                 market: Marketplace | None, max_body_bytes: int, shared: bool = False,
                 max_pending_async: int = 10_000, caller_tags: CallerTags | None = None,
                 stream_window: int = 0, stream_stall_s: float = 60.0) -> None:
        self.replicas = replicas
        self.billing = billing
        self.store = store
        self.metrics = metrics
        self.market = market
        self.max_body_bytes = max_body_bytes
        self.shared = shared  # other gateways share the database: an async call's record is written at once
        self.calls: dict[str, CallRecord] = {}
        self.max_pending_async = max_pending_async
        self.pending_async = 0  # async calls queued or running on this gateway
        self.caller_tags = caller_tags  # the replica gets an opaque tag of each call's caller (prefix caches)
        self.stream_window = stream_window  # COCOON_STREAM_WINDOW_BYTES: per-stream credit (cocoon_faas/flow.py)
        self.stream_stall_s = stream_stall_s  # COCOON_STREAM_STALL_S: a client that takes nothing this long is cut
        self.streams: weakref.WeakSet[CallStream] = weakref.WeakSet()  # open streams (buffered bytes: a metric)

    # -- admit -----------------------------------------------------------------------------------------
    async def admit(self, request: Request, call_id: str, plan: Callable[[bytes], Plan]) -> Call:
        """Authenticate (API key, or a payment instead), read the body within the limit, let the entry point
        validate it into a Plan, then hold the payment (last: bad input changes no state, charges nothing)."""
        paid = PAYMENT_HEADER in request.headers
        caller = None if paid else developer_of(request)
        p = plan(await read_body(request, self.max_body_bytes))
        hold = self.billing.begin(request.headers, p.fr.name, p.fr.spec, call_id, units=p.units)
        if hold is None and CALL_ID_HEADER in request.headers:  # a paid call's id is unique in the ledger already
            self.store.claim_call_id(call_id)  # the client's id, seen once on any gateway: a resent call runs once
        if caller is None:
            assert hold is not None  # a payment header was sent, so begin() held or raised
            caller = f"channel:{hold.channel_id}"
        meta = p.meta if self.caller_tags is None else {**p.meta, "caller": self.caller_tags.tag(p.fr.name, caller)}
        return Call(call_id, p.fr, p.body, caller, hold, self, p.route, p.check, p.units, meta)

    # -- unary ------------------------------------------------------------------------------------------
    async def unary(self, call: Call, body: bytes | None = None, on_running: Any = None) -> Answer:
        """Dispatch one unary replica call of `call` (an entry point that fans out calls this per unit and
        settles itself); checks a sealed final frame. Raises only CancelledError."""
        ans = await unary(self.replicas, call.fr, call.body if body is None else body, call.meta, call.route,
                          on_running)
        if call.check is not None:
            if ans.error is not None:
                ans.error = call.check.platform_error(ans.error)
            elif ans.body is not None:
                try:
                    ans.exec_ms, ans.error = call.check.final(call, ans.body, ans.meta, ans.replica)
                except CocoonError as exc:
                    ans.body, ans.error = None, exc
        return ans

    def usage_of(self, call: Call, ans: Answer) -> Usage | None:
        """The token usage a per-token priced call reports: in the result's "usage" (plain) or the replica's
        final-frame meta (sealed: the gateway cannot read the result)."""
        if not call.per_token:
            return None
        if call.check is not None:
            return Usage.from_json(ans.meta.get("usage"))
        return _usage_in(ans.body)

    async def run(self, call: Call, on_running: Any = None) -> tuple[Answer, Settlement]:
        """A unary call from dispatch to settlement."""
        try:
            ans = await self.unary(call, on_running=on_running)
        except asyncio.CancelledError:
            call.finish(CallCancelledError(f"call {call.id} was cancelled"), 0.0, "local")
            raise
        paid = call.finish(ans.error, ans.exec_ms, ans.provider, self.usage_of(call, ans), ans.meta.get("logs"),
                           ans.body)
        return ans, paid

    # -- async ------------------------------------------------------------------------------------------
    def async_room(self) -> None:
        """Refuse one more async call, before it is admitted (nothing held, nothing recorded), when this gateway
        already keeps COCOON_MAX_PENDING_ASYNC_CALLS queued or running: each holds memory until it finishes."""
        if self.pending_async >= self.max_pending_async:
            raise OverloadedError(
                f"this gateway already runs {self.pending_async} async calls (COCOON_MAX_PENDING_ASYNC_CALLS="
                f"{self.max_pending_async}); retry shortly, or call without 'Prefer: respond-async'", retry_after=1)

    def _async_done(self, _task: asyncio.Task[None]) -> None:
        self.pending_async -= 1

    def submit(self, call: Call) -> CallRecord:
        """Run `call` in the background; its record answers GET /v1/calls/{id} until the result TTL."""
        rec = CallRecord(call.id, call.fr.name, call.fr.version)
        self.calls[call.id] = rec
        self.store.record_call(call.id, call.fr.name, call.fr.version, "queued", rec.created, None, None, None,
                               None, call.caller, durable=self.shared)  # another gateway may be asked about it
        call.keep_result = True

        def running() -> None:
            rec.status = "running"
            if self.shared:  # other gateways poll the store: batched, so it lands before the outcome's record
                self.store.record_call(call.id, call.fr.name, call.fr.version, "running", rec.created, None, None,
                                       None, None, call.caller)

        async def go() -> None:
            try:
                ans, paid = await self.run(call, running)
            except asyncio.CancelledError:
                rec.status, rec.finished = "cancelled", time.time()
                rec.error = CallCancelledError(f"call {call.id} was cancelled").to_dict()["error"]
                return
            rec.finished = time.time()
            if ans.error is None:
                rec.status, rec.result = "succeeded", _kept(call, ans.body)
            else:
                rec.status = "cancelled" if ans.error.type == "cancelled" else "failed"
                if ans.body is not None and call.check is not None:  # a sealed function error: its frame
                    ans.error.details["sealed_frame"] = base64.b64encode(ans.body).decode()
                rec.error = ans.error.to_dict()["error"]
            rec.charge = paid.charge

        rec.task = asyncio.get_running_loop().create_task(go())
        self.pending_async += 1  # counted until the task ends, even one cancelled before it first ran
        rec.task.add_done_callback(self._async_done)
        return rec

    # -- streams ----------------------------------------------------------------------------------------
    def stream(self, call: Call) -> CallStream:
        return CallStream(self, call)

    def stream_buffered_bytes(self) -> int:
        """Bytes of streamed items this gateway holds for clients that have not taken them yet, all streams."""
        return sum(st.frames.buffered for st in self.streams)

    # -- settle and record ------------------------------------------------------------------------------
    def settle(self, call: Call, err: CocoonError | None, exec_ms: float, provider: str, usage: Usage | None,
               logs: Any, result: bytes | None, bill: bool) -> Settlement:
        fr = call.fr
        status = "succeeded" if err is None else ("cancelled" if err.type == "cancelled" else "failed")
        charge: int | None = None
        receipt: str | None = None
        if call.hold is not None:
            try:
                charge, receipt = self.billing.finish(call.hold, fr.spec, fr.owner, provider, exec_ms, bill,
                                                      fr.measurement, usage)
            except CocoonError as exc:  # never lose the answer over bookkeeping; the sweeper releases the hold
                log.error("settling call %s failed: %s", call.id, exc.message)
        if provider != "local" and self.market is not None and bill:
            try:  # the provider's earnings view (the ledger books the money when the call is paid)
                self.market.credit(provider, Requirements.from_spec(fr.spec, confidential=fr.flags.confidential),
                                   int(exec_ms * 1e6))
            except CocoonError:
                pass  # the node left meanwhile
        elapsed = time.monotonic() - call.t0
        fr.calls += 1
        if err is not None:
            fr.errors += 1
        else:
            fr.latencies.append(elapsed * 1000)
        self.metrics.observe(fr.name, status, elapsed)
        if logs:
            self.store.record_logs(fr.name, fr.version, call.id, logs)
        if err is not None:
            text = err.message if err.type == "function_error" else f"{err.type}: {err.message}"
            self.store.record_logs(fr.name, fr.version, call.id, [("error", text)])
        now = time.time()
        error = err.to_dict()["error"] if err else None
        ms = exec_ms if err is None or err.type == "function_error" else None
        if call.keep_result:  # async: kept by id for GET /v1/calls/{id}
            kept = _kept(call, result) if err is None else None
            self.store.record_call(call.id, fr.name, fr.version, status, now - elapsed, now, ms, error, kept,
                                   call.caller)
        else:
            self.store.log_call(call.id, fr.name, fr.version, status, now - elapsed, now, ms, error, call.caller)
        return Settlement(status, charge, receipt, usage, exec_ms)


class CallStream:
    """A streaming call: `await open()` (dispatch until the first frame), iterate the CHUNK frames, then
    `end()`; `fail(err)` on an error mid-stream; `close()` always (a client gone settles here)."""

    def __init__(self, pipeline: Pipeline, call: Call) -> None:
        self.pipeline, self.call = pipeline, call
        self.frames = StreamFrames(pipeline.replicas, call.fr, call.body, call.meta, call.route,
                                   pipeline.stream_window)
        self.first: Frame | None = None
        self.final: Frame | None = None
        self.delivered = 0  # chunks handed on to the client
        self.usage: Usage | None = None  # the last usage an item reported (per-token functions)

    async def open(self) -> None:
        """Wait for the first frame; on failure the call is settled and the (client-facing) error raised."""
        self.pipeline.streams.add(self)
        try:
            self.first = await self.frames.__anext__()
        except asyncio.CancelledError:  # the client went away before the first frame
            self.call.finish(CallCancelledError(f"call {self.call.id}: the client went away"), 0.0, self._provider())
            raise
        except CocoonError as exc:
            err = self.call.check.platform_error(exc) if self.call.check is not None else exc
            self.call.finish(err, self.frames.error_ms, self._provider())
            await self.frames.aclose()
            raise err from None

    def _provider(self) -> str:
        r = self.frames.replica
        return (r.node or "local") if r is not None else "local"

    async def chunks(self) -> AsyncIterator[Frame]:
        """The CHUNK frames in order; the END frame is kept in `final`. A CocoonError mid-stream propagates
        (call `fail`)."""
        frame = self.first
        assert frame is not None, "open() first"
        check = self.call.check
        while frame.type == P.CHUNK:
            if check is not None:
                check.observe(self.call, frame.body, frame.meta)
            elif self.call.per_token:
                self.usage = _usage_in(frame.body) or self.usage
            yield frame
            self.delivered += 1
            frame = await self.frames.__anext__()
        self.final = frame

    def end(self) -> Settlement:
        """Settle a stream that reached its END frame (a sealed END is checked first: a CocoonError is raised,
        after settling, when it fails)."""
        assert self.final is not None
        meta = self.final.meta
        ms = float(meta.get("ms") or 0.0)
        err: CocoonError | None = None
        check = self.call.check
        if check is not None:
            try:
                ms, err = check.final(self.call, self.final.body, meta, self.frames.replica)
            except CocoonError as exc:
                self.call.finish(exc, 0.0, self._provider())
                raise
            if self.call.per_token:
                self.usage = Usage.from_json(meta.get("usage"))
        return self.call.finish(err, ms, self._provider(), self.usage, meta.get("logs"))

    def fail(self, err: CocoonError) -> CocoonError:
        """Settle a stream that failed mid-way (no-op if settled already); the error the client sees."""
        if self.call.check is not None:
            err = self.call.check.platform_error(err)
        self.call.finish(err, self.frames.error_ms, self._provider())
        return err

    async def close(self, why: str = "the client closed the stream") -> Settlement:
        """Always call last. A stream not yet settled was cut (the client went away, or stopped taking bytes):
        released, or on a per-token function charged for what was delivered."""
        self.pipeline.streams.discard(self)
        try:
            await self.frames.aclose()
        finally:
            if self.call.settlement is None:
                cut = CallCancelledError(f"call {self.call.id}: {why} after {self.delivered} items")
                if self.call.per_token and self.delivered:
                    prompt = self.usage.prompt_tokens if self.usage is not None else 0
                    self.call.finish(cut, 0.0, self._provider(), Usage(prompt, self.delivered), bill=True)
                else:
                    self.call.finish(cut, 0.0, self._provider())
        assert self.call.settlement is not None
        return self.call.settlement


def _usage_in(body: bytes | None) -> Usage | None:
    """The "usage" an item or result reports, if it is a JSON object that carries one."""
    if not body or b'"usage"' not in body:
        return None
    try:
        item = json.loads(body)
    except ValueError:
        return None
    return Usage.from_json(item.get("usage")) if isinstance(item, dict) else None


def _kept(call: Call, body: bytes | None) -> bytes | None:
    if body is None:
        return None
    return call.check.kept(body) if call.check is not None else body
