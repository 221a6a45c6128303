"""HPKE (RFC 9180) base mode for one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.

Why our own and not `cryptography.hazmat.primitives.hpke`: that API (cryptography 50) offers single-shot
encrypt/decrypt only, with no AAD, no sequence-numbered context and no way to fix the ephemeral key. Envelopes
need AAD (the routing header), a context whose sequence numbers order stream chunks, and known-answer tests with
fixed ephemerals. This module is RFC 9180 §4-§5.2 for the suite above, checked against Appendix A.2.1 and against
`cryptography`'s implementation (interop both ways) in tests/test_envelope_hpke.py.

The X25519 function itself (RFC 7748, scalar clamped, u-coordinate's top bit masked: the same on both libraries)
comes from libsodium through PyNaCl: on the per-call path it is as fast as OpenSSL's for a Diffie-Hellman, twice
as fast for making a key, and cffi releases the GIL while it runs. Keys may be `cryptography` objects or raw
32-byte strings.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError

from cocoon_faas.confidential.errors import EnvelopeError

PrivateKey = X25519PrivateKey | bytes
PublicKey = X25519PublicKey | bytes

_hmac: Callable[..., bytes] = hmac.digest
try:  # what hmac.digest calls, without its per-call dispatch (a dozen HMACs per sealed call)
    from _hashlib import hmac_digest as _hmac
except ImportError:  # pragma: no cover - Python builds without OpenSSL's hashlib
    pass

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0003
_KEM_SUITE = b"KEM" + KEM_ID.to_bytes(2, "big")
_SUITE = b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
N_ENC, N_K, N_N, N_H = 32, 32, 12, 32


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return _hmac(salt or bytes(N_H), ikm, "sha256")


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    if length <= N_H:  # one block: the common case, one HMAC
        return _hmac(prk, info + b"\x01", "sha256")[:length]
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = _hmac(prk, t + info + bytes([i]), "sha256")
        out += t
        i += 1
    return out[:length]


def labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info, length)


def public_bytes(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


def derive_key_pair(ikm: bytes) -> X25519PrivateKey:
    """RFC 9180 §7.1.3 DeriveKeyPair for X25519."""
    prk = labeled_extract(_KEM_SUITE, b"", b"dkp_prk", ikm)
    return X25519PrivateKey.from_private_bytes(labeled_expand(_KEM_SUITE, prk, b"sk", b"", 32))


# Constant parts of the key schedule, hashed once (the HMAC inputs are the RFC's, only computed ahead).
_EAE_PREFIX = b"HPKE-v1" + _KEM_SUITE + b"eae_prk"
_SS_PREFIX = N_H.to_bytes(2, "big") + b"HPKE-v1" + _KEM_SUITE + b"shared_secret"
_PSK_ID_HASH = labeled_extract(_SUITE, b"", b"psk_id_hash", b"")
_SECRET_IKM = b"HPKE-v1" + _SUITE + b"secret"
_KEY_PREFIX = N_K.to_bytes(2, "big") + b"HPKE-v1" + _SUITE + b"key"
_NONCE_PREFIX = N_N.to_bytes(2, "big") + b"HPKE-v1" + _SUITE + b"base_nonce"
_INFO_HASHES: dict[bytes, bytes] = {}


def remember_info(info: bytes) -> None:
    """Hash a constant `info` once (protocol constants such as the content-key wrap's)."""
    _INFO_HASHES[info] = labeled_extract(_SUITE, b"", b"info_hash", info)


def _shared_secret(dh: bytes, kem_context: bytes) -> bytes:
    prk = _hmac(bytes(N_H), _EAE_PREFIX + dh, "sha256")
    return _hmac(prk, _SS_PREFIX + kem_context + b"\x01", "sha256")


class Context:
    """An HPKE encryption context (§5.2): seal/open with the sequence number as the nonce counter."""

    __slots__ = ("key", "base_nonce", "_nonce_int", "_secret", "_ksc", "_exporter", "seq", "_aead")

    def __init__(self, key: bytes, base_nonce: bytes, exporter_secret: bytes | None = None, seq: int = 0, *,
                 secret: bytes = b"", ksc: bytes = b"") -> None:
        self.key, self.base_nonce, self.seq = key, base_nonce, seq
        self._nonce_int = int.from_bytes(base_nonce, "big")
        self._exporter, self._secret, self._ksc = exporter_secret, secret, ksc
        self._aead = ChaCha20Poly1305(key)

    @property
    def exporter_secret(self) -> bytes:
        if self._exporter is None:  # derived on first use: most contexts never export
            self._exporter = labeled_expand(_SUITE, self._secret, b"exp", self._ksc, N_H)
        return self._exporter

    def _nonce(self) -> bytes:
        return (self._nonce_int ^ self.seq).to_bytes(N_N, "big")

    def seal(self, aad: bytes, pt: bytes) -> bytes:
        ct = self._aead.encrypt(self._nonce(), pt, aad)
        self.seq += 1
        return ct

    def open(self, aad: bytes, ct: bytes | memoryview) -> bytes:
        try:
            pt = self._aead.decrypt(self._nonce(), ct, aad)
        except InvalidTag:
            raise EnvelopeError("decrypt", "ciphertext does not authenticate: altered, reordered, or sealed to "
                                "another key") from None
        self.seq += 1
        return pt

    def export(self, exporter_context: bytes, length: int) -> bytes:
        return labeled_expand(_SUITE, self.exporter_secret, b"sec", exporter_context, length)


def _key_schedule(shared_secret: bytes, info: bytes) -> Context:
    info_hash = _INFO_HASHES.get(info) or labeled_extract(_SUITE, b"", b"info_hash", info)
    ksc = b"\x00" + _PSK_ID_HASH + info_hash
    secret = _hmac(shared_secret, _SECRET_IKM, "sha256")
    return Context(_hmac(secret, _KEY_PREFIX + ksc + b"\x01", "sha256"),
                   _hmac(secret, _NONCE_PREFIX + ksc + b"\x01", "sha256")[:N_N], secret=secret, ksc=ksc)


def generate() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private, public)."""
    sk = os.urandom(32)
    return sk, crypto_scalarmult_base(sk)


def generate_public(sk: bytes) -> bytes:
    return crypto_scalarmult_base(sk)


def _raw_private(sk: PrivateKey) -> bytes:
    return sk if isinstance(sk, bytes) else sk.private_bytes_raw()


def _raw_public(pk: PublicKey) -> bytes:
    raw = bytes(pk) if isinstance(pk, (bytes, bytearray, memoryview)) else public_bytes(pk)
    if len(raw) != N_ENC:
        raise ValueError(f"an X25519 public key is {N_ENC} bytes, got {len(raw)}")
    return raw


def dh(sk: PrivateKey, pk: PublicKey) -> bytes:
    """X25519(sk, pk); ValueError when the result is all zeros (a low-order point), as RFC 9180 §7.1.4 asks."""
    try:
        return crypto_scalarmult(_raw_private(sk), _raw_public(pk))
    except CryptoError:
        raise ValueError("X25519 with a low-order public key") from None


def setup_sender(pk_r: PublicKey, info: bytes, *, ephemeral: PrivateKey | None = None,
                 ephemeral_public: bytes | None = None) -> tuple[bytes, Context]:
    """SetupBaseS: returns (enc, context). `ephemeral`: a fresh key made ahead of time (or a fixed one for
    known-answer tests), `ephemeral_public` its public bytes when already known."""
    pk_bytes = _raw_public(pk_r)
    if ephemeral is None:
        sk_e, enc = generate()
    else:
        sk_e = _raw_private(ephemeral)
        enc = ephemeral_public or crypto_scalarmult_base(sk_e)
    return enc, _key_schedule(_shared_secret(dh(sk_e, pk_bytes), enc + pk_bytes), info)


def setup_receiver(enc: bytes, sk_r: PrivateKey, info: bytes, pk_r: bytes | None = None) -> Context:
    """SetupBaseR. `pk_r`: the receiver's public bytes when already known."""
    if len(enc) != N_ENC:
        raise EnvelopeError("decrypt", f"HPKE enc must be {N_ENC} bytes, got {len(enc)}")
    sk = _raw_private(sk_r)
    try:
        shared = dh(sk, enc)
    except ValueError:
        raise EnvelopeError("decrypt", "HPKE enc is not a usable X25519 public key") from None
    return _key_schedule(_shared_secret(shared, bytes(enc) + (pk_r or crypto_scalarmult_base(sk))), info)


def seal(pk_r: PublicKey, info: bytes, aad: bytes, pt: bytes, *, ephemeral: PrivateKey | None = None) -> bytes:
    """Single-shot: enc ‖ ciphertext (the layout `cryptography.hpke.Suite.encrypt` uses)."""
    enc, ctx = setup_sender(pk_r, info, ephemeral=ephemeral)
    return enc + ctx.seal(aad, pt)


def open_(sk_r: PrivateKey, info: bytes, aad: bytes, data: bytes, pk_r: bytes | None = None) -> bytes:
    """Single-shot open of enc ‖ ciphertext."""
    return setup_receiver(data[:N_ENC], sk_r, info, pk_r).open(aad, data[N_ENC:])
