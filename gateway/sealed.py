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

import base64
import hmac
import json
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.envelope import (
    GATEWAY_MAC_INFO,
    SEALED_CONTENT_TYPE,
    Receipt,
    peek_envelope,
    peek_response,
    receipt_mac,
)
from cocoon_faas.errors import (
    CocoonError,
    FunctionError,
    InvalidRequestError,
    StaleKeysError,
    error_from_body,
)
from cocoon_faas.gateway.chooser import Eligibility
from cocoon_faas.gateway.controller import FunctionRuntime
from cocoon_faas.gateway.dispatch import Route
from cocoon_faas.gateway.http import refuse_unreadable_answer
from cocoon_faas.gateway.pipeline import Call, Plan
from cocoon_faas.gateway.replica_client import ReplicaHandle
from cocoon_faas.gateway.routes_attest import release_to_locked

if TYPE_CHECKING:
    from cocoon_faas.gateway.billing import Billing

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


class SealedRoute(Route):
    """Only replicas holding a key the envelope is sealed to, unlocked ones first; the chosen replica's price
    rate (it prices its own receipt) and the receipt MAC key the gateway shares with it go in the call meta."""

    def __init__(self, key_ids: set[str], billing: Billing, fr: FunctionRuntime) -> None:
        self.billing, self.fr = billing, fr
        self.want = Eligibility(accept=lambda r: r.extra.get("key_id") in key_ids, none_left=_stale,
                                prefer=lambda r: not r.extra.get("code_locked"))

    def prepare(self, r: ReplicaHandle, meta: dict[str, Any]) -> None:
        meta["rate"] = self.billing.price_for(r.node or "local").per_second(self.fr.spec)
        mac = gateway_mac_key(r)
        if mac is not None:
            meta["gk"] = mac[1]
        else:
            meta.pop("gk", None)


class SealedCheck:
    """The pipeline's FinalCheck for sealed calls: authenticate each final frame's receipt before it is charged."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.receipt: Receipt | None = None

    def observe(self, call: Call, body: bytes, meta: dict[str, Any]) -> None:
        self.capture("from_replica", call.id, meta, body)

    def final(self, call: Call, body: bytes, meta: dict[str, Any], replica: ReplicaHandle | None
              ) -> tuple[float, CocoonError | None]:
        self.observe(call, body, meta)
        kind, self.receipt = check_receipt(body, replica, call.id, meta.get("gm"))
        check_receipt_time(self.receipt, meta)
        return float(self.receipt.exec_ms), (FunctionError(SEALED_ERROR_MESSAGE, sealed=True) if kind == "err"
                                             else None)

    def platform_error(self, err: CocoonError) -> CocoonError:
        return platform_error(err)

    def kept(self, body: bytes) -> bytes:
        return json.dumps({"sealed_frame": base64.b64encode(body).decode()}).encode()

    def end_fields(self) -> dict[str, Any]:
        r = self.receipt
        return {} if r is None else {"frames": r.frames, "exec_ms": float(r.exec_ms)}


def sealed_plan(request: Request, call_id: str, kinds: tuple[str, ...] = ()) -> Any:
    """The body of a sealed call, checked on its clear header only: the function it names (the one in the path
    for `/fn/{name}`; for the OpenAI routes, one that serves one of `kinds`), and live replicas holding its keys."""
    gw = request.app.state.gw

    def plan(body: bytes) -> Plan:
        hdr = peek_envelope(body)
        if kinds:
            fr = gw.controller.get(hdr.function)
            if not any(s.partition(":")[0] in kinds for s in fr.spec.serves):
                raise InvalidRequestError(f"function {fr.name!r} serves none of {list(kinds)}; post its sealed "
                                          f"calls to /fn/{fr.name}")
        else:
            fr = gw.controller.get(request.path_params["name"])
            if hdr.function != fr.name:
                raise InvalidRequestError(f"the envelope is sealed for {hdr.function!r} but was posted to "
                                          f"/fn/{fr.name}; post it to /fn/{hdr.function}")
        if not kinds:  # the OpenAI routes answer in their own shapes (`stream` in the sealed body decides)
            refuse_unreadable_answer(request, fr.name, fr.spec.streams)
        kids = set(hdr.key_ids)
        holders = [r for r in fr.ready if r.extra.get("key_id") in kids]
        if not holders:
            raise _stale(fr)
        if any(r.extra.get("code_locked") for r in holders):
            release_to_locked(fr)
        capture = Capture(gw.settings.capture_forwarded)
        capture("to_replica", call_id, {"sealed": True}, body)
        return Plan(fr, body, SealedRoute(kids, gw.billing, fr), SealedCheck(capture),
                    meta={"sealed": True, "royalty": fr.spec.price})

    return plan


def platform_error(err: CocoonError) -> CocoonError:
    """A replica's plain ERROR frame for a sealed call carries its HTTP status and type (stale keys 421, replay
    409, bad envelope 400): rebuild the matching exception so the client sees the same error it would locally."""
    status = err.details.get("status")
    if not isinstance(status, int):
        return err
    fields = {k: v for k, v in err.details.items() if k not in ("status", "ms")}
    fields.setdefault("message", err.message)
    return error_from_body(status, {"error": fields})


_mac_keys: weakref.WeakKeyDictionary[ReplicaHandle, tuple[bytes, str]] = weakref.WeakKeyDictionary()


def gateway_mac_key(r: ReplicaHandle) -> tuple[bytes, str] | None:
    """(key, wrapped hex) of the receipt MAC key this gateway shares with replica `r`: made once per replica,
    HPKE-sealed to the HPKE key of its attested document (aad: its key id), so only that replica can open it.
    Kept here, beside the replica rather than in its public facts (it is a secret)."""
    mac = _mac_keys.get(r)
    if mac is None:
        doc = r.extra.get("document")
        if not isinstance(doc, dict):
            return None
        try:
            key = os.urandom(32)
            wrapped = hpke.seal(bytes.fromhex(doc["hpke_public_key"]), GATEWAY_MAC_INFO,
                                bytes.fromhex(doc["key_id"]), key)
        except (TypeError, KeyError, ValueError):
            return None
        mac = _mac_keys[r] = (key, wrapped.hex())
    return mac


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
        mac = _mac_keys.get(r)
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


def check_receipt_time(receipt: Receipt, meta: dict[str, Any]) -> None:
    """A receipt may not bill more time than this gateway waited for the call (`wall_ms`, measured by the
    gateway's replica client; 1 ms of slack for rounding)."""
    wall = meta.get("wall_ms")
    if isinstance(wall, float) and float(receipt.exec_ms) > wall + 1.0:
        raise _bad_response(f"the replica's receipt bills {receipt.exec_ms} ms for a call the gateway waited "
                            f"{wall:.3f} ms for; the call is not charged")
