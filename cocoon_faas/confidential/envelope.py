"""Sealed-call wire formats, version 1: request envelopes, response frames and receipts (docs/confidential.md).

Binary, big-endian lengths, each part authenticated before it is used:

    request  = "CSQ1" ‖ u32 hlen ‖ header ‖ content
      header  = canonical JSON {"v":1, "t":"req", "fn", "rid", "ts", "to": [{"kid", "wk"}, ...]}
                (routing-visible: the gateway reads `fn` and the key ids `kid` without any key)
      wk      = HPKE(replica key, info "cocoon/v1 content-key", aad fn‖rid‖kid, content key ‖ reply_pk), hex
      content = ChaCha20-Poly1305(content key, nonce 0, aad "CSQ1"‖hlen‖header, args JSON)
    frame    = "CSR1" ‖ u32 hlen ‖ header ‖ u32 clen ‖ ct ‖ u32 rlen ‖ receipt JSON (rlen may be 0)
      header  = canonical JSON {"v":1, "t":"res"|"chunk"|"end"|"err", "rid", "kid", "enc", "seq"}
      ct      = HPKE context to reply_pk (info "cocoon/v1 response" ‖ SHA-256(request)), sequence = seq,
                aad "CSR1" ‖ header
    receipt  = canonical JSON of `Receipt` plus "sig": Ed25519 by the replica's receipt key over
               "cocoon-receipt/v1" ‖ 0x00 ‖ canonical JSON without "sig"

The content key is fresh per request, so the fixed nonce never repeats under one key. The content key and the
caller's fresh X25519 reply key travel inside the HPKE wraps, which only the listed replicas can open (so the
payload is encrypted once and never copied to prepend the key); the header is bound into the content's AAD, so any
edit of a routing field breaks decryption.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cocoon_faas.confidential.document import canonical_json
from cocoon_faas.confidential.errors import EnvelopeError

SEALED_CONTENT_TYPE = "application/cocoon-sealed"
SEALED_FRAME_CONTENT_TYPE = "application/cocoon-sealed-frame"
REQUEST_MAGIC = b"CSQ1"
FRAME_MAGIC = b"CSR1"
VERSION = 1
CONTENT_NONCE = bytes(12)
WRAP_INFO = b"cocoon/v1 content-key"
RESPONSE_INFO = b"cocoon/v1 response\x00"
RECEIPT_DOMAIN = b"cocoon-receipt/v1\x00"
FRAME_KINDS = ("res", "chunk", "end", "err")
FINAL_KINDS = ("res", "end", "err")
MAX_HEADER = 1 << 20


def wrap_aad(function: str, request_id: str, kid: str) -> bytes:
    return f"{function}\x00{request_id}\x00{kid}".encode()


def response_info(request_sha256: bytes) -> bytes:
    return RESPONSE_INFO + request_sha256


def _split_header(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], int]:
    if data[:4] != magic:
        raise EnvelopeError("envelope", f"not a Cocoon sealed {what} (magic {data[:4]!r}, want {magic!r}); "
                            "upgrade the client or send plain JSON")
    if len(data) < 8:
        raise EnvelopeError("envelope", f"sealed {what} truncated")
    hlen = struct.unpack_from(">I", data, 4)[0]
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise EnvelopeError("envelope", f"sealed {what} header length {hlen} exceeds the body")
    try:
        header = json.loads(data[8:8 + hlen])
    except ValueError:
        raise EnvelopeError("envelope", f"sealed {what} header is not JSON") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise EnvelopeError("envelope", f"sealed {what} version {header.get('v') if isinstance(header, dict) else '?'}"
                            f" is not {VERSION}")
    return header, 8 + hlen


@dataclass(frozen=True)
class Recipient:
    key_id: str
    wrapped_key: bytes


@dataclass(frozen=True)
class EnvelopeHeader:
    """The routing-visible part of a sealed request; reading it needs no key."""

    function: str
    request_id: str
    timestamp_ms: int
    recipients: tuple[Recipient, ...]
    header_end: int

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(r.key_id for r in self.recipients)


def peek_envelope(body: bytes) -> EnvelopeHeader:
    """Parse a sealed request's header without decrypting anything (the gateway's view)."""
    h, end = _split_header(body, REQUEST_MAGIC, "request")
    try:
        if h["t"] != "req":
            raise ValueError("t")
        fn, rid, ts = h["fn"], h["rid"], h["ts"]
        if not (isinstance(fn, str) and isinstance(rid, str) and len(rid) == 32 and isinstance(ts, int)):
            raise ValueError("fields")
        recips = tuple(Recipient(str(r["kid"]), bytes.fromhex(r["wk"])) for r in h["to"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError("envelope", f"sealed request header is malformed ({exc}); reseal with a current "
                            "client") from None
    if not recips:
        raise EnvelopeError("envelope", "sealed request names no replica key")
    return EnvelopeHeader(fn, rid, ts, recips, end)


def encode_request(header: dict[str, Any], content: bytes) -> tuple[bytes, bytes]:
    """(prefix, body): the prefix (magic ‖ hlen ‖ header) is the content's AAD."""
    hb = canonical_json(header)
    prefix = REQUEST_MAGIC + struct.pack(">I", len(hb)) + hb
    return prefix, b"".join((prefix, content))


@dataclass(frozen=True)
class Receipt:
    """What a replica attests about one call; the gateway's charge must match it."""

    call_id: str
    request_id: str
    function: str
    measurement: str
    key_id: str
    request_sha256: str
    response_sha256: str
    exec_ms: float
    price_nanoton: int
    frames: int
    signature: str = ""
    v: int = VERSION

    def _unsigned(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("signature")
        return d

    def signed_message(self) -> bytes:
        return RECEIPT_DOMAIN + canonical_json(self._unsigned())

    def sign(self, key: Ed25519PrivateKey) -> Receipt:
        return Receipt(**{**self._unsigned(), "signature": key.sign(self.signed_message()).hex()})

    def verify(self, public_key: Ed25519PublicKey | bytes) -> None:
        if isinstance(public_key, bytes):
            public_key = Ed25519PublicKey.from_public_bytes(public_key)
        try:
            public_key.verify(bytes.fromhex(self.signature), self.signed_message())
        except (ValueError, InvalidSignature):
            raise EnvelopeError("receipt_signature", "the receipt is not signed by the replica's receipt key "
                                "(forged, or from another replica)") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Receipt:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise EnvelopeError("receipt", f"receipt is malformed ({exc})") from None


@dataclass(frozen=True)
class Frame:
    """A parsed (not yet decrypted) response frame."""

    kind: str
    request_id: str
    key_id: str
    enc: bytes
    seq: int
    aad: bytes
    ciphertext: bytes
    receipt: Receipt | None


def frame_aad(header: dict[str, Any]) -> tuple[bytes, bytes]:
    """(header bytes, AAD) of a response frame."""
    hb = canonical_json(header)
    return hb, FRAME_MAGIC + hb


def assemble_frame(hb: bytes, ct: bytes, receipt: Receipt | None) -> bytes:
    rb = receipt.to_bytes() if receipt else b""
    return b"".join((FRAME_MAGIC, struct.pack(">I", len(hb)), hb, struct.pack(">I", len(ct)), ct,
                     struct.pack(">I", len(rb)), rb))


def decode_frame(data: bytes) -> Frame:
    """Parse a response frame; nothing is authenticated yet (the client opens it, the gateway may peek)."""
    h, pos = _split_header(data, FRAME_MAGIC, "response")
    try:
        clen = struct.unpack_from(">I", data, pos)[0]
        ct = data[pos + 4:pos + 4 + clen]
        pos += 4 + clen
        rlen = struct.unpack_from(">I", data, pos)[0]
        rb = data[pos + 4:pos + 4 + rlen]
        if len(ct) != clen or len(rb) != rlen or pos + 4 + rlen != len(data):
            raise ValueError("lengths")
        kind, seq = h["t"], h["seq"]
        if kind not in FRAME_KINDS or not isinstance(seq, int) or seq < 0:
            raise ValueError("kind/seq")
        enc = bytes.fromhex(h["enc"])
        rid, kid = str(h["rid"]), str(h["kid"])
        receipt = Receipt.from_dict(json.loads(rb)) if rlen else None
        if receipt is not None and (receipt.to_bytes() != rb or bytes.fromhex(receipt.signature).hex()
                                    != receipt.signature):
            raise ValueError("receipt is not in canonical form")
    except (struct.error, KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError("envelope", f"sealed response frame is malformed ({exc})") from None
    if (receipt is None) == (kind in FINAL_KINDS):
        raise EnvelopeError("envelope", f"a '{kind}' frame must {'' if kind in FINAL_KINDS else 'not '}carry a receipt")
    hb = data[8:8 + struct.unpack_from(">I", data, 4)[0]]
    return Frame(kind, rid, kid, enc, seq, FRAME_MAGIC + hb, ct, receipt)


def peek_response(frame: bytes) -> Frame:
    """The gateway's view of a response frame: kind, ids, and the (unverified) receipt; verify it with
    `frame.receipt.verify(replica.receipt_public_key)` before charging."""
    return decode_frame(frame)


class ResponseHash:
    """SHA-256 over a call's frame ciphertexts in order, each length-prefixed (the receipt's response_sha256)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, ct: bytes) -> None:
        self._h.update(struct.pack(">I", len(ct)))
        self._h.update(ct)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
