"""The gateway's half of a confidential call: route a sealed envelope on its clear header, forward opaque bytes.

`POST /fn/{name}` with `Content-Type: application/cocoon-sealed` (also accepted: `application/cocoon-sealed+json`;
the body is the binary envelope of docs/confidential.md either way). The gateway reads only what
`peek_envelope` exposes (function name, request id, timestamp, replica key ids). It checks no arguments (it cannot
read them); the replica does. It sends the call only to a live replica whose key id the envelope lists, preferring
ones whose code is unlocked; when none is left it answers `421 stale_keys` so the client refetches the documents
and reseals once. Answers:

* unary: `200`, `Content-Type: application/cocoon-sealed-frame`, the replica's sealed frame (`res`, or `err`
  for the function's own exception; `X-Cocoon-Sealed-Kind` says which). Platform failures (timeout, replay 409,
  stale keys 421, bad envelope 400) are the usual JSON errors; they hold no payload.
* streaming: SSE; each sealed frame is `event: frame` with the base64 frame as data, then `event: end` with the
  call id, the metered time and the charge.
* `Prefer: respond-async`: 202 as usual; the call record's result is `{"sealed_frame": base64}`.

The charge uses the receipt's metered execution time, after the receipt is authenticated: by an HMAC under a key
the gateway sealed (HPKE) to the replica's attested key and sends with each call (`gk`; the replica answers with
the tag `gm`), or, when a replica gives no tag, by its Ed25519 signature against the attested receipt key. The
replica prices it from the rate the gateway sends (`rate` nanoton per second, `royalty`), so receipt price +
operator fee = the charge. Nothing here ever decrypts or unpickles.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from cocoon_faas import protocol as P
from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.envelope import (
    GATEWAY_MAC_INFO,
    SEALED_CONTENT_TYPE,
    SEALED_FRAME_CONTENT_TYPE,
    Receipt,
    peek_envelope,
    peek_response,
    receipt_mac,
)
from cocoon_faas.errors import (
    CocoonError,
    FunctionError,
    InvalidRequestError,
    OverloadedError,
    StaleKeysError,
    error_from_body,
)
from cocoon_faas.gateway.billing import PAYMENT_HEADER
from cocoon_faas.gateway.controller import Controller, FunctionRuntime
from cocoon_faas.gateway.http import developer_of, error_response, json_response, read_body
from cocoon_faas.gateway.invoke import Invoker, Outcome
from cocoon_faas.gateway.replica_client import Frame, ReplicaHandle
from cocoon_faas.gateway.router import choose

SEALED_TYPES = (SEALED_CONTENT_TYPE, "application/cocoon-sealed+json")
SEALED_ERROR_MESSAGE = "the function raised an error; its type and message are sealed to the caller"


def is_sealed(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() in SEALED_TYPES


def _stale(fr: FunctionRuntime) -> StaleKeysError:
    return StaleKeysError(f"the request is sealed to replica keys of {fr.name!r} that are gone; refetch "
                          f"GET /v1/functions/{fr.name}/attestation and reseal (the SDK does this once by itself)")


def _bad_response(message: str) -> CocoonError:
    err = CocoonError(message)
    err.status, err.type = 502, "bad_replica_response"
    return err


class Capture:
    """Appends every body the gateway forwards for sealed calls to a file (COCOON_CAPTURE_FORWARDED)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, direction: str, call_id: str, meta: dict[str, Any], body: bytes) -> None:
        if self.path is None:
            return
        head = json.dumps({"dir": direction, "call": call_id, "meta": meta, "len": len(body)}).encode()
        with open(self.path, "ab") as f:
            f.write(head + b"\n" + bytes(body) + b"\n")


class KeyedController:
    """The controller's acquire/release as the Invoker sees them, restricted to replicas the envelope is sealed
    to. It also writes the chosen replica's price rate into the call meta (read by the replica for its receipt)."""

    def __init__(self, controller: Controller, key_ids: set[str], call_meta: dict[str, Any], billing: Any) -> None:
        self.controller, self.key_ids, self.call_meta, self.billing = controller, key_ids, call_meta, billing
        self.used: dict[str, ReplicaHandle] = {}
        self.last: ReplicaHandle | None = None

    def _pick(self, fr: FunctionRuntime) -> ReplicaHandle | None:
        cands = [r for r in fr.ready if r.extra.get("key_id") in self.key_ids]
        if not cands:
            raise _stale(fr)
        unlocked = [r for r in cands if not r.extra.get("code_locked")]
        if len(unlocked) < len(cands):
            from cocoon_faas.gateway.routes_attest import _spawn, peer_release

            _spawn(peer_release(fr))
        return choose(unlocked, fr.spec.max_concurrency, self.controller.rng) or choose(
            cands, fr.spec.max_concurrency, self.controller.rng)

    def _take(self, fr: FunctionRuntime, r: ReplicaHandle) -> ReplicaHandle:
        r.inflight += 1
        self.used[r.id], self.last = r, r
        self.call_meta["rate"] = self.billing.price_for(r.node or "local").per_second(fr.spec)
        mac = gateway_mac_key(r)
        if mac is not None:
            self.call_meta["gk"] = mac[1]
        else:
            self.call_meta.pop("gk", None)
        return r

    async def acquire(self, fr: FunctionRuntime, deadline: float) -> ReplicaHandle:
        r = self._pick(fr)
        if r is not None:
            return self._take(fr, r)
        if fr.queued >= self.controller.settings.queue_limit:
            raise OverloadedError(f"every replica of {fr.name!r} this call is sealed to is busy; retry shortly",
                                  retry_after=1)
        fr.queued += 1
        try:
            loop = asyncio.get_running_loop()
            while True:
                if self.controller.functions.get(fr.name) is not fr:
                    raise _stale(fr)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    from cocoon_faas.errors import CallTimeoutError

                    raise CallTimeoutError(f"no replica of {fr.name!r} this call is sealed to became free "
                                           f"within the call's time limit ({fr.spec.timeout:g}s)")
                fut: asyncio.Future[None] = loop.create_future()
                fr.waiters.append(fut)
                try:
                    await asyncio.wait_for(fut, min(remaining, 0.25))
                except asyncio.TimeoutError:
                    pass
                r = self._pick(fr)
                if r is not None:
                    return self._take(fr, r)
        finally:
            fr.queued -= 1

    def release(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        self.controller.release(fr, r)

    def record(self, r: ReplicaHandle, ok: bool, latency_s: float) -> None:
        record = getattr(self.controller, "record", None)  # node health feedback, when the controller keeps it
        if record is not None:
            record(r, ok, latency_s)


def platform_error(err: CocoonError) -> CocoonError:
    """A replica's plain ERROR frame for a sealed call carries its HTTP status and type (stale keys 421, replay
    409, bad envelope 400): rebuild the matching exception so the client sees the same error it would locally."""
    status = err.details.get("status")
    if not isinstance(status, int):
        return err
    fields = {k: v for k, v in err.details.items() if k not in ("status", "ms")}
    fields.setdefault("message", err.message)
    return error_from_body(status, {"error": fields})


def gateway_mac_key(r: ReplicaHandle) -> tuple[bytes, str] | None:
    """(key, wrapped hex) of the receipt MAC key this gateway shares with replica `r`: made once per replica,
    HPKE-sealed to the HPKE key of its attested document (aad: its key id), so only that replica can open it."""
    mac = r.extra.get("receipt_mac")
    if mac is None:
        doc = r.extra.get("document")
        try:
            key = os.urandom(32)
            wrapped = hpke.seal(bytes.fromhex(doc["hpke_public_key"]), GATEWAY_MAC_INFO,
                                bytes.fromhex(doc["key_id"]), key)
        except (TypeError, KeyError, ValueError):
            return None
        mac = r.extra["receipt_mac"] = (key, wrapped.hex())
    return mac  # type: ignore[no-any-return]


def check_receipt(frame_body: bytes, r: ReplicaHandle | None, call_id: str, tag: str | None = None
                  ) -> tuple[str, Receipt]:
    """(frame kind, receipt) of a final sealed frame, after authenticating the receipt (the replica's MAC `tag`
    under the key from `gateway_mac_key`, else its signature against the attested receipt key) and checking
    that it names this call and replica."""
    try:
        f = peek_response(frame_body)
        doc = r.extra.get("document") if r is not None else None
        if f.receipt is None or not doc or r is None:
            raise ValueError("the final frame has no receipt, or the replica has no document")
        mac = r.extra.get("receipt_mac")
        if tag and mac is not None:
            if not hmac.compare_digest(receipt_mac(mac[0], f.receipt.raw), bytes.fromhex(tag)):
                raise ValueError("the receipt's MAC does not match the key shared with this replica")
        else:
            f.receipt.verify(bytes.fromhex(doc["receipt_public_key"]))
        if f.receipt.call_id != call_id or f.receipt.key_id != doc.get("key_id") or f.key_id != doc.get("key_id"):
            raise ValueError("the receipt names another call or replica")
    except (CocoonError, ValueError, KeyError) as exc:
        raise _bad_response(f"the replica's sealed answer failed the gateway's receipt check ({exc}); the call "
                            "is not charged") from None
    return f.kind, f.receipt


async def call_sealed(request: Request) -> Response:
    """The sealed branch of `POST /fn/{name}`."""
    call_id = uuid.uuid4().hex
    headers = {"X-Cocoon-Call-Id": call_id}
    gw = request.app.state.gw
    try:
        caller = None if PAYMENT_HEADER in request.headers else developer_of(request)
        fr = gw.controller.get(request.path_params["name"])
        body = await read_body(request, gw.settings.max_body_bytes)
        hdr = peek_envelope(body)
        if hdr.function != fr.name:
            raise InvalidRequestError(f"the envelope is sealed for {hdr.function!r} but was posted to "
                                      f"/fn/{fr.name}; post it to /fn/{hdr.function}")
        kids = set(hdr.key_ids)
        if not any(r.extra.get("key_id") in kids for r in fr.ready):
            raise _stale(fr)
        hold = gw.billing.begin(request.headers, fr.name, fr.spec, call_id)
    except CocoonError as exc:
        return error_response(exc, headers)
    caller = caller or f"channel:{hold.channel_id}"
    call_meta: dict[str, Any] = {"id": call_id, "sealed": True, "royalty": fr.spec.price}
    kc = KeyedController(gw.controller, kids, call_meta, gw.billing)
    capture = Capture(gw.settings.capture_forwarded)
    capture("to_replica", call_id, {"sealed": True}, body)
    if "respond-async" in request.headers.get("prefer", "").lower():
        return _submit_async(request, gw, fr, body, call_id, caller, hold, kc, capture, headers)
    if fr.spec.streams:
        return await _stream(gw, fr, body, call_id, caller, hold, kc, capture, headers)
    t0 = time.monotonic()
    outcome, err, meta, kind = await _unary(fr, body, call_id, kc, capture)
    headers.update(gw.finish_call(fr, call_id, caller, t0, outcome if kind == "res" else None, err, meta,
                                  hold=hold))
    if outcome is None:
        assert err is not None
        return error_response(err, headers)
    headers["X-Cocoon-Exec-Ms"] = f"{outcome.exec_ms:.3f}"
    headers["X-Cocoon-Sealed-Kind"] = kind
    return Response(outcome.body, 200, headers, media_type=SEALED_FRAME_CONTENT_TYPE)


async def _unary(fr: FunctionRuntime, body: bytes, call_id: str, kc: KeyedController, capture: Capture
                 ) -> tuple[Outcome | None, CocoonError | None, dict[str, Any], str]:
    """(outcome, error, meta, kind). For a sealed function error: the outcome (its body is the sealed frame to
    return) *and* a FunctionError for the books."""
    outcome, err, meta = await Invoker(kc).call(fr, body, kc.call_meta)  # type: ignore[arg-type]
    if outcome is None:
        assert err is not None
        return None, platform_error(err), meta, ""
    capture("from_replica", call_id, outcome.meta, outcome.body)
    try:
        kind, receipt = check_receipt(outcome.body, kc.used.get(outcome.replica), call_id, outcome.meta.get("gm"))
    except CocoonError as exc:
        return None, exc, {}, ""
    outcome.exec_ms = float(receipt.exec_ms)
    meta = {**meta, "ms": outcome.exec_ms}
    if kind == "err":
        return outcome, FunctionError(SEALED_ERROR_MESSAGE, sealed=True), meta, kind
    return outcome, None, meta, kind


async def _stream(gw: Any, fr: FunctionRuntime, body: bytes, call_id: str, caller: str, hold: Any,
                  kc: KeyedController, capture: Capture, headers: dict[str, str]) -> Response:
    t0 = time.monotonic()
    agen = Invoker(kc).stream(fr, body, kc.call_meta)  # type: ignore[arg-type]
    try:
        first = await agen.__anext__()
    except CocoonError as exc:
        exc = platform_error(exc)
        headers.update(gw.finish_call(fr, call_id, caller, t0, None, exc, {}, hold=hold))
        return error_response(exc, headers)

    async def events() -> AsyncIterator[bytes]:
        frame: Frame = first
        try:
            while True:
                capture("from_replica", call_id, frame.meta, frame.body)
                if frame.type == P.END:
                    try:
                        kind, receipt = check_receipt(frame.body, kc.last, call_id, frame.meta.get("gm"))
                    except CocoonError as exc:
                        gw.finish_call(fr, call_id, caller, t0, None, exc, {}, hold=hold)
                        yield b"event: error\ndata: " + json.dumps(exc.to_dict()).encode() + b"\n\n"
                        return
                    yield b"event: frame\ndata: " + base64.b64encode(frame.body) + b"\n\n"
                    ms = float(receipt.exec_ms)
                    provider = frame.meta.get("provider", "local")
                    err = FunctionError(SEALED_ERROR_MESSAGE, sealed=True) if kind == "err" else None
                    paid = gw.finish_call(fr, call_id, caller, t0, None if err else Outcome(b"", ms, "", 1, provider),
                                          err, {"ms": ms, "provider": provider}, hold=hold)
                    end: dict[str, Any] = {"call_id": call_id, "frames": receipt.frames, "exec_ms": ms}
                    if paid:
                        end["charge"] = int(paid["X-Cocoon-Charge"])
                        end["receipt"] = paid.get("X-Cocoon-Receipt")
                    yield b"event: end\ndata: " + json.dumps(end).encode() + b"\n\n"
                    return
                yield b"event: frame\ndata: " + base64.b64encode(frame.body) + b"\n\n"
                frame = await agen.__anext__()
        except CocoonError as exc:
            exc = platform_error(exc)
            gw.finish_call(fr, call_id, caller, t0, None, exc, {}, hold=hold)
            yield b"event: error\ndata: " + json.dumps(exc.to_dict()).encode() + b"\n\n"
        finally:
            await agen.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _submit_async(request: Request, gw: Any, fr: FunctionRuntime, body: bytes, call_id: str, caller: str,
                  hold: Any, kc: KeyedController, capture: Capture, headers: dict[str, str]) -> Response:
    from cocoon_faas.gateway.routes_fn import CallRecord

    rec = CallRecord(call_id, fr.name, fr.version)
    gw.calls[call_id] = rec
    gw.store.record_call(call_id, fr.name, fr.version, "queued", rec.created, None, None, None, None, caller)

    async def run() -> None:
        t0 = time.monotonic()
        rec.status = "running"
        try:
            outcome, err, meta, kind = await _unary(fr, body, call_id, kc, capture)
        except asyncio.CancelledError:
            from cocoon_faas.errors import CallCancelledError

            outcome, err, meta, kind = None, CallCancelledError(f"call {call_id} was cancelled"), {}, ""
        rec.finished = time.time()
        kept = None
        if outcome is not None:
            sealed = base64.b64encode(outcome.body).decode()
            kept = Outcome(json.dumps({"sealed_frame": sealed}).encode(), outcome.exec_ms, outcome.replica,
                           outcome.attempts, outcome.provider)
            if err is not None:
                err.details["sealed_frame"] = sealed
        if err is None:
            assert kept is not None
            rec.status, rec.result = "succeeded", kept.body
        else:
            rec.status = "cancelled" if err.type == "cancelled" else "failed"
            rec.error = err.to_dict()["error"]
        paid = gw.finish_call(fr, call_id, caller, t0, kept if kind == "res" else None, err, meta,
                              result_kept=True, hold=hold)
        if "X-Cocoon-Charge" in paid:
            rec.charge = int(paid["X-Cocoon-Charge"])

    rec.task = asyncio.get_running_loop().create_task(run())
    url = f"{str(request.base_url).rstrip('/')}/v1/calls/{rec.id}"
    return json_response({"id": rec.id, "status": rec.status, "status_url": url}, 202,
                         {**headers, "Location": url})
