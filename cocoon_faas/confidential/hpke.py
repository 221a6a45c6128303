"""HPKE (RFC 9180) base mode for one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.

Why our own and not `cryptography.hazmat.primitives.hpke`: that API (cryptography 50) offers single-shot
encrypt/decrypt only, with no AAD, no sequence-numbered context and no way to fix the ephemeral key. Envelopes
need AAD (the routing header), a context whose sequence numbers order stream chunks, and known-answer tests with
fixed ephemerals. This module is RFC 9180 §4-§5.2 for the suite above, checked against Appendix A.2.1 and against
`cryptography`'s implementation (interop both ways) in tests/test_envelope_hpke.py.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cocoon_faas.confidential.errors import EnvelopeError

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0003
_KEM_SUITE = b"KEM" + KEM_ID.to_bytes(2, "big")
_SUITE = b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
N_ENC, N_K, N_N, N_H = 32, 32, 12, 32


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or bytes(N_H), ikm, "sha256")


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.digest(prk, t + info + bytes([i]), "sha256")
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


def _shared_secret(dh: bytes, kem_context: bytes) -> bytes:
    prk = labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return labeled_expand(_KEM_SUITE, prk, b"shared_secret", kem_context, N_H)


@dataclass
class Context:
    """An HPKE encryption context (§5.2): seal/open with the sequence number as the nonce counter."""

    key: bytes
    base_nonce: bytes
    exporter_secret: bytes
    seq: int = 0
    _aead: ChaCha20Poly1305 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._aead = ChaCha20Poly1305(self.key)

    def _nonce(self) -> bytes:
        return (int.from_bytes(self.base_nonce, "big") ^ self.seq).to_bytes(N_N, "big")

    def seal(self, aad: bytes, pt: bytes) -> bytes:
        ct = self._aead.encrypt(self._nonce(), pt, aad)
        self.seq += 1
        return ct

    def open(self, aad: bytes, ct: bytes) -> bytes:
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
    psk_id_hash = labeled_extract(_SUITE, b"", b"psk_id_hash", b"")
    info_hash = labeled_extract(_SUITE, b"", b"info_hash", info)
    ksc = b"\x00" + psk_id_hash + info_hash
    secret = labeled_extract(_SUITE, shared_secret, b"secret", b"")
    return Context(labeled_expand(_SUITE, secret, b"key", ksc, N_K),
                   labeled_expand(_SUITE, secret, b"base_nonce", ksc, N_N),
                   labeled_expand(_SUITE, secret, b"exp", ksc, N_H))


def setup_sender(pk_r: X25519PublicKey | bytes, info: bytes, *,
                 ephemeral: X25519PrivateKey | None = None) -> tuple[bytes, Context]:
    """SetupBaseS: returns (enc, context). `ephemeral` is for known-answer tests only."""
    if isinstance(pk_r, bytes):
        pk_r = X25519PublicKey.from_public_bytes(pk_r)
    sk_e = ephemeral or X25519PrivateKey.generate()
    enc = public_bytes(sk_e.public_key())
    dh = sk_e.exchange(pk_r)
    return enc, _key_schedule(_shared_secret(dh, enc + public_bytes(pk_r)), info)


def setup_receiver(enc: bytes, sk_r: X25519PrivateKey, info: bytes) -> Context:
    """SetupBaseR."""
    if len(enc) != N_ENC:
        raise EnvelopeError("decrypt", f"HPKE enc must be {N_ENC} bytes, got {len(enc)}")
    try:
        dh = sk_r.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError:
        raise EnvelopeError("decrypt", "HPKE enc is not a usable X25519 public key") from None
    return _key_schedule(_shared_secret(dh, enc + public_bytes(sk_r.public_key())), info)


def seal(pk_r: X25519PublicKey | bytes, info: bytes, aad: bytes, pt: bytes, *,
         ephemeral: X25519PrivateKey | None = None) -> bytes:
    """Single-shot: enc ‖ ciphertext (the layout `cryptography.hpke.Suite.encrypt` uses)."""
    enc, ctx = setup_sender(pk_r, info, ephemeral=ephemeral)
    return enc + ctx.seal(aad, pt)


def open_(sk_r: X25519PrivateKey, info: bytes, aad: bytes, data: bytes) -> bytes:
    """Single-shot open of enc ‖ ciphertext."""
    return setup_receiver(data[:N_ENC], sk_r, info).open(aad, data[N_ENC:])
