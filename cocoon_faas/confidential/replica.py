"""The replica side of confidential calls: keys generated in the worker, its attestation document, opening
sealed requests (with replay protection) and sealing responses, stream chunks and errors with signed receipts.

Formats: `envelope.py`. The gateway never holds a `ReplicaIdentity`; it lives in the replica process.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.document import (
    DOCUMENT_VERSION,
    canonical_json,
    dev_evidence,
    document_binding,
    gpu_evidence_sha256,
    key_id,
    load_or_create_dev_key,
    tdx_evidence,
)
from cocoon_faas.confidential.envelope import (
    CONTENT_NONCE,
    GATEWAY_MAC_INFO,
    RECEIPT_DOMAIN,
    WRAP_INFO,
    ReceiptSigner,
    ResponseHash,
    assemble_frame,
    encode_receipt,
    frame_head,
    peek_envelope,
    receipt_mac,
    response_info,
    wrap_aad,
)
from cocoon_faas.confidential.errors import CheckFailed, EnvelopeError, NotSealedToThisReplica, ReplayError

TSM_REPORT_DIR = Path("/sys/kernel/config/tsm/report")
Rng = Callable[[int], bytes]


def tsm_quote(report_data: bytes, base: Path = TSM_REPORT_DIR, name: str | None = None) -> bytes:
    """A TDX quote over `report_data` through the kernel's configfs-tsm interface."""
    if len(report_data) != 64:
        raise ValueError("REPORTDATA must be 64 bytes")
    if not base.is_dir():
        raise CheckFailed("tee_unavailable", f"{base} does not exist: no TDX guest here. Start the replica with "
                          "evidence='dev' on machines without a TEE")
    entry = base / (name or f"cocoon-{os.getpid()}-{os.urandom(4).hex()}")
    entry.mkdir(exist_ok=True)
    try:
        provider = entry / "provider"
        if provider.exists() and provider.read_text().strip() not in ("tdx_guest", ""):
            raise CheckFailed("tee_unavailable", f"configfs-tsm provider is {provider.read_text().strip()}, not TDX")
        (entry / "inblob").write_bytes(report_data)
        return (entry / "outblob").read_bytes()
    finally:
        try:
            entry.rmdir()
        except OSError:
            pass


class ReplayGuard:
    """Bounded memory of seen request ids plus a timestamp window. Ids are forgotten oldest *timestamp* first
    (not oldest arrival), and every request at or before a forgotten timestamp is refused, so forgetting never
    re-admits a replay. Ordering by timestamp is what keeps honest calls working whatever others send: a request
    dated at the window's future edge is forgotten last, so it can never raise the floor over honest requests
    (ordered by arrival, it would be evicted first and refuse every request older than it until it expired)."""

    def __init__(self, window_s: float = 300.0, capacity: int = 100_000) -> None:
        self.window_ms = int(window_s * 1000)
        self.capacity = capacity
        self._seen: dict[str, int] = {}
        self._by_ts: list[tuple[int, str]] = []  # heap of (timestamp, id): the next to forget on top
        self._floor = -1
        self._lock = threading.Lock()

    def check(self, request_id: str, ts_ms: int, now_ms: int) -> None:
        if abs(now_ms - ts_ms) > self.window_ms:
            raise ReplayError("replay_window", f"request timestamp is {(now_ms - ts_ms) / 1000:.0f}s from the "
                              f"replica's clock (window ±{self.window_ms / 1000:.0f}s); reseal the request")
        with self._lock:
            if request_id in self._seen or ts_ms <= self._floor:
                raise ReplayError("replay", "this request was already delivered (replayed request id)")
            self._seen[request_id] = ts_ms
            heapq.heappush(self._by_ts, (ts_ms, request_id))
            while self._by_ts and (len(self._by_ts) > self.capacity or self._by_ts[0][0] < now_ms - self.window_ms):
                old, rid = heapq.heappop(self._by_ts)
                del self._seen[rid]
                self._floor = max(self._floor, old)


@dataclass
class ReplicaCallContext:
    """Per-call state for sealing the answer: reply key, response HPKE context, frame counter, hash, and the
    final frame's receipt bytes (for the gateway's MAC)."""

    function: str
    request_id: str
    request_sha256: bytes
    reply_public_key: bytes
    key_id: str
    next_seq: int = 0
    finished: bool = False
    receipt: bytes = b""
    _enc: bytes = b""
    _ctx: hpke.Context | None = None
    _hash: ResponseHash = field(default_factory=ResponseHash)


@dataclass(frozen=True)
class OpenedRequest:
    args_json: bytes
    ctx: ReplicaCallContext


class ReplicaIdentity:
    """Keys and document of one replica. Build with `ReplicaIdentity.create(...)`."""

    def __init__(self, function: str, measurement: str, runtime_version: str, hpke_key: X25519PrivateKey,
                 receipt_key: Ed25519PrivateKey, document: dict[str, Any], *, evidence: str,
                 dev_key: Ed25519PrivateKey | None, replay: ReplayGuard, rng: Rng | None,
                 gpu: tuple[bytes, bytes] | None, tsm_dir: Path) -> None:
        self.function, self.measurement, self.runtime_version = function, measurement, runtime_version
        self._hpke_key, self._receipt_key = hpke_key, receipt_key
        self._hpke_raw = hpke_key.private_bytes_raw()
        self._signer = ReceiptSigner(receipt_key)
        self.hpke_public_key = hpke.public_bytes(hpke_key.public_key())
        self.receipt_public_key = receipt_key.public_key().public_bytes_raw()
        self.key_id = key_id(self.hpke_public_key)
        self._kid = bytes.fromhex(self.key_id)
        self.document = document
        self.evidence_kind = evidence
        self._dev_key, self._gpu, self._tsm_dir = dev_key, gpu, tsm_dir
        self.replay = replay
        self._rng = rng
        self._code_key: bytes | None = None
        self._next_ephemeral: tuple[bytes, bytes] | None = None
        self._gateway_keys: OrderedDict[bytes, bytes] = OrderedDict()

    @classmethod
    def create(cls, function: str, measurement: str, runtime_version: str, evidence: str = "dev",
               ttl_s: float = 3600.0, dev_key: Ed25519PrivateKey | Path | str | None = None, *,
               home: Path | None = None, now: float | None = None, rng: Rng | None = None,
               gpu_evidence: tuple[bytes, bytes] | None = None, tsm_dir: Path = TSM_REPORT_DIR,
               replay_window_s: float = 300.0, replay_capacity: int = 100_000) -> ReplicaIdentity:
        """Generate fresh keys and a document. `dev_key`: a key, a COCOON_HOME directory, or None (use `home`,
        else the settings' home). `gpu_evidence`: (NVIDIA report, PEM chain) to hash into the document.
        `rng` (known-answer tests only) makes the keys and response ephemerals deterministic."""
        if evidence not in ("dev", "tdx"):
            raise ValueError(f"evidence must be 'dev' or 'tdx', not {evidence!r}")
        try:
            if len(bytes.fromhex(measurement)) != 32:
                raise ValueError
        except ValueError:
            raise ValueError(f"measurement must be a SHA-256 digest in hex, not {measurement!r}") from None
        if rng is None:
            hpke_key, receipt_key = X25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        else:
            hpke_key = hpke.derive_key_pair(rng(32))
            receipt_key = Ed25519PrivateKey.from_private_bytes(rng(32))
        dk: Ed25519PrivateKey | None = None
        if evidence == "dev":
            if isinstance(dev_key, Ed25519PrivateKey):
                dk = dev_key
            else:
                if dev_key is None and home is None:
                    from cocoon_faas.settings import get_settings

                    home = get_settings().home
                dk = load_or_create_dev_key(Path(dev_key) if dev_key is not None else Path(home or "."))
        ident = cls(function, measurement.lower(), runtime_version, hpke_key, receipt_key, {}, evidence=evidence,
                    dev_key=dk, replay=ReplayGuard(replay_window_s, replay_capacity), rng=rng, gpu=gpu_evidence,
                    tsm_dir=tsm_dir)
        ident.renew(ttl_s, now=now)
        return ident

    @property
    def insecure(self) -> bool:
        return self.evidence_kind == "dev"

    def renew(self, ttl_s: float = 3600.0, now: float | None = None) -> dict[str, Any]:
        """Re-issue the document (same keys, fresh evidence and expiry)."""
        t = int(now if now is not None else time.time())
        body: dict[str, Any] = {
            "v": DOCUMENT_VERSION, "function": self.function, "measurement": self.measurement,
            "runtime_version": self.runtime_version, "tee": self.evidence_kind,
            "hpke_public_key": self.hpke_public_key.hex(), "receipt_public_key": self.receipt_public_key.hex(),
            "key_id": self.key_id, "issued_at": t, "expires_at": t + int(ttl_s)}
        if self._gpu is not None:
            body["gpu_evidence_sha256"] = gpu_evidence_sha256(*self._gpu)
        if self.evidence_kind == "dev":
            assert self._dev_key is not None
            ev = dev_evidence(body, self._dev_key)
            if self._gpu is not None:
                ev["nvidia"] = tdx_evidence(b"", *self._gpu)["nvidia"]
        else:
            gpu = self._gpu or (None, None)
            ev = tdx_evidence(tsm_quote(document_binding(body), self._tsm_dir), gpu[0], gpu[1])
        self.document = {**body, "evidence": ev}
        return self.document

    @property
    def document_json(self) -> bytes:
        return canonical_json(self.document)

    # -- requests ------------------------------------------------------------------------------------------

    def open_request(self, envelope: bytes, now_ms: int | None = None) -> OpenedRequest:
        """Authenticate and decrypt a sealed request; refuse replays. Raises `EnvelopeError` subclasses."""
        hdr = peek_envelope(envelope)
        if hdr.function != self.function:
            raise EnvelopeError("function", f"request is sealed for '{hdr.function}', this replica runs "
                                f"'{self.function}'")
        wrapped = hdr.wrapped_for(self.key_id)
        if wrapped is None:
            raise NotSealedToThisReplica("key_id", "the request is not sealed to this replica's key; refetch "
                                         "the attestation documents and reseal")
        keys = hpke.open_(self._hpke_raw, WRAP_INFO, wrap_aad(hdr.function, hdr.request_id, self.key_id), wrapped,
                          self.hpke_public_key)
        if len(keys) != 64:
            raise EnvelopeError("envelope", "the wrapped key must hold a content key and a reply key")
        view = memoryview(envelope)
        try:
            args = ChaCha20Poly1305(keys[:32]).decrypt(CONTENT_NONCE, view[hdr.header_end:],
                                                       view[:hdr.header_end])
        except (InvalidTag, ValueError):
            raise EnvelopeError("decrypt", "the sealed request does not authenticate (altered in transit)") from None
        self.replay.check(hdr.request_id, hdr.timestamp_ms, now_ms if now_ms is not None else int(time.time() * 1000))
        ctx = ReplicaCallContext(self.function, hdr.request_id, hashlib.sha256(envelope).digest(), keys[32:],
                                 self.key_id)
        return OpenedRequest(args, ctx)

    def prepare(self) -> None:
        """Make the next response's ephemeral key ahead of time (call when idle, e.g. after sending a frame);
        each key is still used for one response only."""
        if self._next_ephemeral is None and self._rng is None:
            self._next_ephemeral = hpke.generate()

    def _ephemeral(self) -> tuple[bytes, bytes]:
        if self._rng is not None:
            k = hpke.derive_key_pair(self._rng(32))
            return k.private_bytes_raw(), hpke.public_bytes(k.public_key())
        if self._next_ephemeral is None:
            self.prepare()
        eph, self._next_ephemeral = self._next_ephemeral, None
        assert eph is not None
        return eph

    def gateway_tag(self, ctx: ReplicaCallContext, wrapped_key: bytes | str | None) -> str | None:
        """The gateway's MAC over this call's receipt, under the key the gateway sealed to this replica
        (unwrapped once, then remembered); None without a final frame or a usable key (the gateway then
        verifies the signature instead)."""
        if not ctx.receipt or not wrapped_key:
            return None
        try:
            wk = bytes.fromhex(wrapped_key) if isinstance(wrapped_key, str) else wrapped_key
            key = self._gateway_keys.get(wk)
            if key is None:
                key = hpke.open_(self._hpke_raw, GATEWAY_MAC_INFO, self._kid, wk, self.hpke_public_key)
                self._gateway_keys[wk] = key
                if len(self._gateway_keys) > 16:
                    self._gateway_keys.popitem(last=False)
        except (EnvelopeError, ValueError):
            return None
        return receipt_mac(key, ctx.receipt).hex()

    # -- responses -----------------------------------------------------------------------------------------

    def _frame(self, ctx: ReplicaCallContext, kind: str, pt: bytes, receipt_fields: dict[str, Any] | None) -> bytes:
        if ctx.finished:
            raise EnvelopeError("order", "this call's response is already complete")
        if ctx._ctx is None:
            eph, eph_pub = self._ephemeral()
            ctx._enc, ctx._ctx = hpke.setup_sender(ctx.reply_public_key, response_info(ctx.request_sha256),
                                                   ephemeral=eph, ephemeral_public=eph_pub)
        seq = ctx.next_seq
        rid = bytes.fromhex(ctx.request_id)
        head = frame_head(kind, rid, self._kid, ctx._enc, seq)
        ct = ctx._ctx.seal(head, pt)
        ctx._hash.update(ct)
        ctx.next_seq += 1
        receipt = b""
        if receipt_fields is not None:
            ctx.finished = True
            unsigned = encode_receipt(receipt_fields["call_id"], rid, self.function, bytes.fromhex(self.measurement),
                                      self._kid, ctx.request_sha256, ctx._hash.digest(), receipt_fields["exec_us"],
                                      receipt_fields["price_nanoton"], seq + 1)
            if self._signer.key is not self._receipt_key:
                self._signer = ReceiptSigner(self._receipt_key)
            receipt = ctx.receipt = unsigned + self._signer.sign(RECEIPT_DOMAIN + unsigned)
        return assemble_frame(head, ct, receipt)

    @staticmethod
    def _meter(call_id: str, exec_ms: float, price_nanoton: int) -> dict[str, Any]:
        return {"call_id": str(call_id), "exec_us": round(float(exec_ms) * 1000), "price_nanoton": int(price_nanoton)}

    def seal_response(self, ctx: ReplicaCallContext, call_id: str, result_json: bytes, exec_ms: float,
                      price_nanoton: int) -> bytes:
        """The one frame answering a unary call, with its signed receipt."""
        return self._frame(ctx, "res", result_json, self._meter(call_id, exec_ms, price_nanoton))

    def seal_chunk(self, ctx: ReplicaCallContext, seq: int, item_json: bytes) -> bytes:
        """One streamed item; `seq` must be the next frame number (0, 1, ...)."""
        if seq != ctx.next_seq:
            raise EnvelopeError("order", f"chunk seq {seq} is not the next frame ({ctx.next_seq})")
        return self._frame(ctx, "chunk", item_json, None)

    def seal_end(self, ctx: ReplicaCallContext, call_id: str, exec_ms: float, price_nanoton: int) -> bytes:
        """The authenticated end of a stream; its receipt covers every chunk."""
        return self._frame(ctx, "end", b"", self._meter(call_id, exec_ms, price_nanoton))

    def seal_error(self, ctx: ReplicaCallContext, call_id: str, error_type: str, message: str,
                   exec_ms: float = 0.0, price_nanoton: int = 0) -> bytes:
        """A function error, sealed (its message may hold user data), ending the call with a receipt."""
        pt = canonical_json({"type": error_type, "message": message})
        return self._frame(ctx, "err", pt, self._meter(call_id, exec_ms, price_nanoton))

    # -- confidential deployments (see keyrelease.py) -------------------------------------------------------

    def open_code(self, sealed: bytes, grant: bytes) -> bytes:
        """Unwrap a key grant addressed to this replica and decrypt the sealed code bundle with it."""
        from cocoon_faas.confidential.keyrelease import open_code, open_grant, peek_sealed_code

        hdr = peek_sealed_code(sealed)
        if hdr.measurement != self.measurement:
            raise EnvelopeError("measurement", "the sealed code is for another measurement than this replica's")
        key = open_grant(grant, self._hpke_key, self.key_id, self.measurement)
        code = open_code(sealed, key)
        self._code_key = key
        return code

    def peer_grant(self, sealed: bytes, peer_document: dict[str, Any] | bytes, now: float | None = None) -> bytes:
        """Release the code key this replica holds to a peer that passes the sealed code's own policy."""
        from cocoon_faas.confidential.keyrelease import grant_code_key

        key = self._code_key
        if key is None:
            raise EnvelopeError("no_code_key", "this replica holds no code key to release")
        return grant_code_key(key, sealed, peer_document, now=now)[0]
