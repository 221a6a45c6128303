"""The caller side of confidential calls: seal a request to every verified replica, open the sealed answer.

`seal_request` encrypts the arguments once under a fresh content key and wraps that key to each replica
(formats: `envelope.py`); its fresh reply key and wrap ephemerals are made ahead of time (`prepared.py`). The returned `ClientCallContext` holds the reply key and checks every frame: request
id, which replica answered (one of those sealed to, and only one per call), frame order, decryption, and on the
final frame the receipt (signature by that replica's receipt key, measurement, request and response hashes).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.document import VerifiedReplica
from cocoon_faas.confidential.envelope import (
    CONTENT_NONCE,
    WRAP_INFO,
    Frame,
    Receipt,
    ResponseHash,
    decode_frame,
    encode_prefix,
    response_info,
    wrap_aad,
)
from cocoon_faas.confidential.errors import EnvelopeError
from cocoon_faas.confidential.prepared import Prepared
from cocoon_faas.errors import FunctionError

Rng = Callable[[int], bytes]
_PREPARED = Prepared(WRAP_INFO)  # reply keys and wrap contexts made ahead, each used once (prepared.py)
PREPARE_AHEAD = True  # False: make them inline (benchmarks compare both)


@dataclass(frozen=True)
class OpenedFrame:
    kind: str
    data: bytes
    receipt: Receipt | None


@dataclass
class ClientCallContext:
    """What the caller keeps to open the answer to one sealed request."""

    function: str
    request_id: str
    body: bytes | bytearray = field(repr=False)
    replicas: dict[str, VerifiedReplica] = field(repr=False)
    reply_key: X25519PrivateKey | bytes = field(repr=False)
    key_id: str | None = None
    finished: bool = False
    _request_sha256: bytes | None = None
    _enc: bytes = b""
    _ctx: hpke.Context | None = None
    _next_seq: int = 0
    _hash: ResponseHash = field(default_factory=ResponseHash)
    _reply_public: bytes = b""

    def __post_init__(self) -> None:
        if not self._reply_public:
            k = self.reply_key
            self._reply_public = hpke.generate_public(k) if isinstance(k, bytes) else hpke.public_bytes(k.public_key())

    @property
    def request_sha256(self) -> bytes:
        if self._request_sha256 is None:
            self._request_sha256 = hashlib.sha256(self.body).digest()
        return self._request_sha256

    def open_frame(self, data: bytes) -> OpenedFrame:
        """Authenticate and decrypt the next frame of this call, in order."""
        f = decode_frame(data)
        if self.finished:
            raise EnvelopeError("order", "a frame arrived after the call's final frame")
        if f.request_id != self.request_id:
            raise EnvelopeError("request_id", "the response answers another request (replayed or misrouted)")
        replica = self.replicas.get(f.key_id)
        if replica is None:
            raise EnvelopeError("replica", "the response comes from a replica this call was not sealed to")
        if self._ctx is None:
            self.key_id, self._enc = f.key_id, f.enc
            self._ctx = hpke.setup_receiver(f.enc, self.reply_key, response_info(self.request_sha256),
                                            self._reply_public)
        elif f.key_id != self.key_id or f.enc != self._enc:
            raise EnvelopeError("replica", "frames of one call come from different replicas or sessions")
        if f.seq != self._next_seq:
            raise EnvelopeError("order", f"frame {f.seq} arrived where frame {self._next_seq} was due "
                                "(dropped, duplicated or reordered)")
        pt = self._ctx.open(f.aad, f.ciphertext)
        self._hash.update(f.ciphertext)
        self._next_seq += 1
        if f.receipt is not None:
            self._check_receipt(f, f.receipt, replica)
            self.finished = True
        return OpenedFrame(f.kind, pt, f.receipt)

    def _check_receipt(self, f: Frame, r: Receipt, replica: VerifiedReplica) -> None:
        r.verify(replica.receipt_public_key)
        if r.measurement != replica.measurement:
            raise EnvelopeError("measurement", f"the receipt names measurement {r.measurement[:16]}..., the "
                                f"verified replica runs {replica.measurement[:16]}...")
        if (r.request_id, r.function, r.key_id) != (self.request_id, self.function, replica.key_id):
            raise EnvelopeError("receipt", "the receipt is for another call, function or replica")
        if r.request_sha256 != self.request_sha256.hex():
            raise EnvelopeError("receipt_request", "the receipt covers a different request ciphertext")
        if r.response_sha256 != self._hash.hexdigest() or r.frames != f.seq + 1:
            raise EnvelopeError("receipt_response", "the receipt covers a different response ciphertext")

    def open_response(self, data: bytes) -> tuple[bytes, Receipt]:
        """Open a unary answer: (result JSON, verified receipt). A sealed function error raises FunctionError."""
        o = self.open_frame(data)
        if o.kind == "err":
            self._raise(o)
        if o.kind != "res" or o.receipt is None:
            raise EnvelopeError("order", f"expected a unary response frame, got '{o.kind}'")
        return o.data, o.receipt

    def open_chunk(self, data: bytes) -> bytes | Receipt:
        """Open the next stream frame: an item's JSON, or at the authenticated end the verified `Receipt`."""
        o = self.open_frame(data)
        if o.kind == "err":
            self._raise(o)
        if o.kind == "chunk":
            return o.data
        if o.kind == "end" and o.receipt is not None:
            return o.receipt
        raise EnvelopeError("order", f"a '{o.kind}' frame inside a stream")

    @staticmethod
    def _raise(o: OpenedFrame) -> None:
        try:
            err = json.loads(o.data)
            etype, message = str(err["type"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            etype, message = "Error", o.data.decode(errors="replace")
        raise FunctionError(f"{etype}: {message}", exception_type=etype,
                            receipt=o.receipt.to_dict() if o.receipt else None)


def seal_request(args_json: bytes, function: str, replicas: Sequence[VerifiedReplica], *,
                 rng: Rng | None = None, now_ms: int | None = None) -> tuple[bytearray, ClientCallContext]:
    """Seal `args_json` for `function` to every replica; returns (body to POST, context to open the answer).
    The body is the `bytearray` the content was encrypted into, so a large payload is never copied: send it as
    `content=[body]` with a `Content-Length` header (httpx), or `bytes(body)`. `rng`/`now_ms` are for
    known-answer tests only."""
    if not replicas:
        raise EnvelopeError("no_replica", f"no verified replica of '{function}' to seal to; fetch and verify its "
                            "attestation documents first")
    rand = rng or os.urandom
    content_key, rid = rand(32), rand(16)
    request_id = rid.hex()
    reply_key: X25519PrivateKey | bytes
    if rng is None and PREPARE_AHEAD:
        reply_key, reply_public = _PREPARED.take_key()
    elif rng is None:
        reply_key, reply_public = hpke.generate()
    else:
        derived = hpke.derive_key_pair(rand(32))
        reply_key, reply_public = derived, hpke.public_bytes(derived.public_key())
    key_and_reply = content_key + reply_public
    wraps: list[tuple[bytes, bytes]] = []
    by_kid: dict[str, VerifiedReplica] = {}
    for r in replicas:
        if r.function != function:
            raise EnvelopeError("function", f"replica {r.key_id} runs '{r.function}', not '{function}'")
        if r.key_id in by_kid:
            continue
        pk = r.hpke_public_key
        if rng is None and PREPARE_AHEAD:
            enc, wctx = _PREPARED.take_sender(pk)
        elif rng is None:
            enc, wctx = hpke.setup_sender(pk, WRAP_INFO)
        else:
            enc, wctx = hpke.setup_sender(pk, WRAP_INFO, ephemeral=hpke.derive_key_pair(rand(32)))
        wraps.append((bytes.fromhex(r.key_id), enc + wctx.seal(wrap_aad(function, request_id, r.key_id),
                                                                key_and_reply)))
        by_kid[r.key_id] = r
    ts = now_ms if now_ms is not None else int(time.time() * 1000)
    prefix = encode_prefix(function, rid, ts, wraps)
    n = len(prefix)
    body = bytearray(n + len(args_json) + 16)
    body[:n] = prefix
    ChaCha20Poly1305(content_key).encrypt_into(CONTENT_NONCE, args_json, prefix, memoryview(body)[n:])
    return body, ClientCallContext(function, request_id, body, by_kid, reply_key, _reply_public=reply_public)
