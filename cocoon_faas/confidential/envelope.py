"""Sealed-call wire formats, version 2: request envelopes, response frames and receipts (docs/confidential.md).

Binary, big-endian integers, fixed-size ids (16-byte request and key ids, 32-byte keys and hashes); every part is
authenticated before it is used:

    request  = "CSQ" 0x02 ‖ u32 hlen ‖ header ‖ content
      header  = u16 fnlen ‖ fn ‖ rid(16) ‖ u64 ts_ms ‖ u8 n ‖ n × (kid(16) ‖ wk(112))
                (routing-visible: the gateway reads `fn` and the key ids without any key)
      wk      = HPKE(replica key, info "cocoon/v2 content-key", aad fn‖0‖rid‖0‖kid (hex ids),
                content key ‖ reply_pk) = enc(32) ‖ ct(80)
      content = ChaCha20-Poly1305(content key, nonce 0, aad "CSQ" 0x02 ‖ hlen ‖ header, args JSON)
    frame    = "CSR" 0x02 ‖ u8 kind ‖ rid(16) ‖ kid(16) ‖ enc(32) ‖ u32 seq ‖ u32 clen ‖ ct ‖ u32 rlen ‖ receipt
      aad     = the 73 bytes before clen
      ct      = HPKE context to reply_pk (info "cocoon/v2 response" ‖ 0 ‖ SHA-256(request)), sequence = seq
    receipt  = u8 2 ‖ u8 len ‖ call_id ‖ rid(16) ‖ u16 len ‖ fn ‖ measurement(32) ‖ kid(16) ‖ SHA-256(request) ‖
               SHA-256(response) ‖ u64 exec_us ‖ u64 price_nanoton ‖ u32 frames ‖ signature(64)
      signature = Ed25519 by the replica's receipt key over "cocoon-receipt/v2" ‖ 0 ‖ receipt without signature

Version 1 used canonical JSON headers and receipts; version 2 carries the same fields in binary so that no side
spends its time in JSON, hex or dataclass conversions (the version byte tells them apart; v1 is refused).
The content key is fresh per request, so the fixed nonce never repeats under one key. The content key and the
caller's fresh X25519 reply key travel inside the HPKE wraps, which only the listed replicas can open; the header
is bound into the content's AAD, so any edit of a routing field breaks decryption.

The gateway checks a receipt with a MAC instead of the signature (`receipt_mac`): its MAC key reaches the replica
HPKE-sealed to the replica's attested key (`GATEWAY_MAC_INFO`), so only that replica can tag a receipt; the
caller still verifies the Ed25519 signature, which anyone can check later.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import CryptoError

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.errors import EnvelopeError

SEALED_CONTENT_TYPE = "application/cocoon-sealed"
SEALED_FRAME_CONTENT_TYPE = "application/cocoon-sealed-frame"
VERSION = 2
REQUEST_MAGIC = b"CSQ" + bytes([VERSION])
FRAME_MAGIC = b"CSR" + bytes([VERSION])
CONTENT_NONCE = bytes(12)
WRAP_INFO = b"cocoon/v2 content-key"
RESPONSE_INFO = b"cocoon/v2 response\x00"
RECEIPT_DOMAIN = b"cocoon-receipt/v2\x00"
GATEWAY_MAC_INFO = b"cocoon/v2 gateway-receipt-mac"
RECEIPT_MAC_DOMAIN = b"cocoon-receipt-mac/v2\x00"
FRAME_KINDS = ("res", "chunk", "end", "err")
FINAL_KINDS = ("res", "end", "err")
_KIND_CODE = {k: i + 1 for i, k in enumerate(FRAME_KINDS)}
WRAP_LEN = hpke.N_ENC + 64 + 16
RECIPIENT_LEN = 16 + WRAP_LEN
FRAME_HEAD_LEN = 4 + 1 + 16 + 16 + 32 + 4
MAX_HEADER = 1 << 20
_FRAME_HEAD = struct.Struct(">4sB16s16s32sI")
_RECEIPT_TAIL = struct.Struct(">16s32s32sQQI")
hpke.remember_info(WRAP_INFO)


def wrap_aad(function: str, request_id: str, kid: str) -> bytes:
    return f"{function}\x00{request_id}\x00{kid}".encode()


def response_info(request_sha256: bytes) -> bytes:
    return RESPONSE_INFO + request_sha256


def _magic(data: bytes | bytearray | memoryview, magic: bytes, what: str) -> None:
    if data[:4] != magic:
        if data[:3] == magic[:3] and len(data) >= 4:
            raise EnvelopeError("envelope", f"sealed {what} version {data[3]} is not {VERSION}; upgrade the client")
        raise EnvelopeError("envelope", f"not a Cocoon sealed {what} (magic {bytes(data[:4])!r}, want {magic!r}); "
                            "upgrade the client or send plain JSON")


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

    def wrapped_for(self, key_id: str) -> bytes | None:
        for r in self.recipients:
            if r.key_id == key_id:
                return r.wrapped_key
        return None


def peek_envelope(body: bytes | bytearray | memoryview) -> EnvelopeHeader:
    """Parse a sealed request's header without decrypting anything (the gateway's view)."""
    _magic(body, REQUEST_MAGIC, "request")
    try:
        hlen, fnlen = struct.unpack_from(">IH", body, 4)
        end = 8 + hlen
        if hlen > MAX_HEADER or end > len(body):
            raise EnvelopeError("envelope", f"sealed request header length {hlen} exceeds the body")
        pos = 10 + fnlen
        fn = bytes(body[10:pos]).decode()
        rid, ts, n = struct.unpack_from(">16sQB", body, pos)
        pos += 25
        recips = []
        for _ in range(n):
            recips.append(Recipient(bytes(body[pos:pos + 16]).hex(), bytes(body[pos + 16:pos + RECIPIENT_LEN])))
            pos += RECIPIENT_LEN
        if pos != end:
            raise ValueError(f"the header holds {pos - 8} bytes of fields, hlen says {hlen}")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError("envelope", f"sealed request header is malformed ({exc}); reseal with a current "
                            "client") from None
    if not recips:
        raise EnvelopeError("envelope", "sealed request names no replica key")
    return EnvelopeHeader(fn, rid.hex(), ts, tuple(recips), end)


def encode_prefix(function: str, request_id: bytes, timestamp_ms: int, wraps: list[tuple[bytes, bytes]]) -> bytes:
    """magic ‖ hlen ‖ header for `wraps` = [(kid, wk), ...]; it is also the content's AAD."""
    fn = function.encode()
    parts = [struct.pack(">H", len(fn)), fn, struct.pack(">16sQB", request_id, timestamp_ms, len(wraps))]
    for kid, wk in wraps:
        if len(kid) != 16 or len(wk) != WRAP_LEN:
            raise ValueError("a recipient is a 16-byte key id and a 112-byte wrapped key")
        parts += (kid, wk)
    header = b"".join(parts)
    return REQUEST_MAGIC + struct.pack(">I", len(header)) + header


# -- receipts ----------------------------------------------------------------------------------------------

def encode_receipt(call_id: str, request_id: bytes, function: str, measurement: bytes, key_id: bytes,
                   request_sha256: bytes, response_sha256: bytes, exec_us: int, price_nanoton: int,
                   frames: int) -> bytes:
    """The receipt's bytes without the signature (sign RECEIPT_DOMAIN ‖ these)."""
    cid, fn = call_id.encode(), function.encode()
    if len(cid) > 255 or len(measurement) != 32:
        raise ValueError("call ids are at most 255 bytes and measurements are SHA-256 digests")
    return b"".join((bytes([VERSION, len(cid)]), cid, request_id, struct.pack(">H", len(fn)), fn, measurement,
                     _RECEIPT_TAIL.pack(key_id, request_sha256, response_sha256, exec_us, price_nanoton, frames)))


@dataclass(frozen=True)
class Receipt:
    """What a replica attests about one call; the gateway's charge must match it. `raw` holds the wire bytes."""

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
    raw: bytes = field(default=b"", repr=False, compare=False)

    def _unsigned_bytes(self) -> bytes:
        if self.raw:
            return self.raw[:-64]
        return encode_receipt(self.call_id, bytes.fromhex(self.request_id), self.function,
                              bytes.fromhex(self.measurement), bytes.fromhex(self.key_id),
                              bytes.fromhex(self.request_sha256), bytes.fromhex(self.response_sha256),
                              round(self.exec_ms * 1000), self.price_nanoton, self.frames)

    def signed_message(self) -> bytes:
        return RECEIPT_DOMAIN + self._unsigned_bytes()

    def sign(self, key: Ed25519PrivateKey) -> Receipt:
        unsigned = self._unsigned_bytes()
        return Receipt.from_bytes(unsigned + key.sign(RECEIPT_DOMAIN + unsigned))

    def verify(self, public_key: Ed25519PublicKey | bytes) -> None:
        try:
            sig = self.raw[-64:] if self.raw else bytes.fromhex(self.signature)
        except ValueError:
            sig = b""
        verify_signature(public_key, sig, self.signed_message())

    def to_dict(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "request_id": self.request_id, "function": self.function,
                "measurement": self.measurement, "key_id": self.key_id, "request_sha256": self.request_sha256,
                "response_sha256": self.response_sha256, "exec_ms": self.exec_ms,
                "price_nanoton": self.price_nanoton, "frames": self.frames, "signature": self.signature,
                "v": self.v}

    def to_bytes(self) -> bytes:
        return self.raw or self._unsigned_bytes() + bytes.fromhex(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        try:
            if data[0] != VERSION:
                raise ValueError(f"version {data[0]}")
            n = data[1]
            cid = data[2:2 + n].decode()
            pos = 2 + n
            rid = data[pos:pos + 16]
            (fnlen,) = struct.unpack_from(">H", data, pos + 16)
            pos += 18
            fn = data[pos:pos + fnlen].decode()
            pos += fnlen
            m = data[pos:pos + 32]
            kid, req, resp, exec_us, price, frames = _RECEIPT_TAIL.unpack_from(data, pos + 32)
            pos += 32 + _RECEIPT_TAIL.size
            sig = data[pos:]
            if len(rid) != 16 or len(m) != 32 or len(sig) != 64:
                raise ValueError("lengths")
        except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise EnvelopeError("receipt", f"receipt is malformed ({exc})") from None
        return cls(cid, rid.hex(), fn, m.hex(), kid.hex(), req.hex(), resp.hex(), exec_us / 1000, price, frames,
                   sig.hex(), VERSION, bytes(data))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Receipt:
        try:
            r = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k != "raw"})
            return cls.from_bytes(r.to_bytes())
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvelopeError("receipt", f"receipt is malformed ({exc})") from None


class ReceiptSigner:
    """Ed25519 signing (RFC 8032: deterministic, so libsodium and OpenSSL give the same bytes) with libsodium,
    which signs in two thirds of OpenSSL's time; the key is expanded once."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self._sk = crypto_sign_seed_keypair(key.private_bytes_raw())[1]

    def sign(self, message: bytes) -> bytes:
        return crypto_sign(message, self._sk)[:64]


def verify_signature(public_key: Ed25519PublicKey | bytes, signature: bytes, message: bytes) -> None:
    """Ed25519 verification with libsodium (half of OpenSSL's time); raises EnvelopeError(receipt_signature)."""
    try:
        raw = public_key if isinstance(public_key, bytes) else public_key.public_bytes_raw()
        if len(raw) != 32 or len(signature) != 64:
            raise ValueError("lengths")
        crypto_sign_open(signature + message, raw)
    except (ValueError, CryptoError):
        raise EnvelopeError("receipt_signature", "the receipt is not signed by the replica's receipt key "
                            "(forged, or from another replica)") from None


def receipt_mac(key: bytes, receipt: bytes) -> bytes:
    """The gateway's MAC over a receipt's bytes, under the key it sealed to the replica."""
    return hmac.digest(key, RECEIPT_MAC_DOMAIN + receipt, "sha256")


# -- response frames ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """A parsed (not yet decrypted) response frame."""

    kind: str
    request_id: str
    key_id: str
    enc: bytes
    seq: int
    aad: bytes
    ciphertext: bytes | memoryview
    receipt: Receipt | None

    @property
    def receipt_bytes(self) -> bytes:
        return self.receipt.raw if self.receipt is not None else b""


def frame_head(kind: str, request_id: bytes, key_id: bytes, enc: bytes, seq: int) -> bytes:
    """The frame's first 73 bytes, which are also its AAD."""
    return _FRAME_HEAD.pack(FRAME_MAGIC, _KIND_CODE[kind], request_id, key_id, enc, seq)


def assemble_frame(head: bytes, ct: bytes, receipt: bytes = b"") -> bytes:
    return b"".join((head, struct.pack(">I", len(ct)), ct, struct.pack(">I", len(receipt)), receipt))


def decode_frame(data: bytes) -> Frame:
    """Parse a response frame; nothing is authenticated yet (the client opens it, the gateway may peek)."""
    _magic(data, FRAME_MAGIC, "response")
    try:
        _, code, rid, kid, enc, seq = _FRAME_HEAD.unpack_from(data, 0)
        (clen,) = struct.unpack_from(">I", data, FRAME_HEAD_LEN)
        pos = FRAME_HEAD_LEN + 4 + clen
        (rlen,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + rlen != len(data):
            raise ValueError("lengths")
        if not 1 <= code <= len(FRAME_KINDS):
            raise ValueError(f"kind {code}")
        kind = FRAME_KINDS[code - 1]
        ct = memoryview(data)[FRAME_HEAD_LEN + 4:pos]
    except (struct.error, ValueError) as exc:
        raise EnvelopeError("envelope", f"sealed response frame is malformed ({exc})") from None
    receipt = Receipt.from_bytes(data[pos + 4:]) if rlen else None
    if (receipt is None) == (kind in FINAL_KINDS):
        raise EnvelopeError("envelope", f"a '{kind}' frame must {'' if kind in FINAL_KINDS else 'not '}carry a receipt")
    return Frame(kind, rid.hex(), kid.hex(), enc, seq, bytes(data[:FRAME_HEAD_LEN]), ct, receipt)


def peek_response(frame: bytes) -> Frame:
    """The gateway's view of a response frame: kind, ids, and the (unverified) receipt; check it with
    `receipt_mac` (the gateway's key) or `frame.receipt.verify(replica.receipt_public_key)` before charging."""
    return decode_frame(frame)


class ResponseHash:
    """SHA-256 over a call's frame ciphertexts in order, each length-prefixed (the receipt's response hash)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, ct: bytes | memoryview) -> None:
        self._h.update(struct.pack(">I", len(ct)))
        self._h.update(ct)

    def digest(self) -> bytes:
        return self._h.digest()

    def hexdigest(self) -> str:
        return self._h.hexdigest()
