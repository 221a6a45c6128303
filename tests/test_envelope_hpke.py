"""HPKE: RFC 9180 Appendix A.2.1 known answers, and interop with cryptography's own HPKE."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.errors import EnvelopeError

H = bytes.fromhex
# RFC 9180 A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, mode_base
INFO = H("4f6465206f6e2061204772656369616e2055726e")
IKM_E = H("909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b")
PK_EM = H("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a")
SK_EM = H("f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600")
IKM_R = H("1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df")
PK_RM = H("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a")
SK_RM = H("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb")
KEY = H("ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91")
BASE_NONCE = H("5c4d98150661b848853b547f")
EXPORTER_SECRET = H("a3b010d4994890e2c6968a36f64470d3c824c8f5029942feb11e7a74b2921922")
PT = H("4265617574792069732074727574682c20747275746820626561757479")
CT0 = H("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28")
CT1 = H("6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c")


def test_derive_key_pair_matches_rfc():
    e, r = hpke.derive_key_pair(IKM_E), hpke.derive_key_pair(IKM_R)
    assert e.private_bytes_raw() == SK_EM and hpke.public_bytes(e.public_key()) == PK_EM
    assert r.private_bytes_raw() == SK_RM and hpke.public_bytes(r.public_key()) == PK_RM


def test_sender_context_matches_rfc():
    enc, ctx = hpke.setup_sender(PK_RM, INFO, ephemeral=hpke.derive_key_pair(IKM_E))
    assert enc == PK_EM
    assert (ctx.key, ctx.base_nonce, ctx.exporter_secret) == (KEY, BASE_NONCE, EXPORTER_SECRET)
    assert ctx.seal(b"Count-0", PT) == CT0
    assert ctx.seal(b"Count-1", PT) == CT1


def test_receiver_opens_rfc_ciphertexts_in_order_only():
    ctx = hpke.setup_receiver(PK_EM, X25519PrivateKey.from_private_bytes(SK_RM), INFO)
    with pytest.raises(EnvelopeError):
        ctx.open(b"Count-1", CT1)  # out of order: wrong nonce
    assert ctx.open(b"Count-0", CT0) == PT
    assert ctx.open(b"Count-1", CT1) == PT


def test_interop_with_cryptography_hpke():
    from cryptography.hazmat.primitives import hpke as chpke

    suite = chpke.Suite(chpke.KEM.X25519, chpke.KDF.HKDF_SHA256, chpke.AEAD.CHACHA20_POLY1305)
    sk = X25519PrivateKey.generate()
    theirs = suite.encrypt(b"from cryptography", sk.public_key(), b"ctx")
    assert hpke.open_(sk, b"ctx", b"", theirs) == b"from cryptography"
    ours = hpke.seal(sk.public_key(), b"ctx", b"", b"from cocoon")
    assert suite.decrypt(ours, sk, b"ctx") == b"from cocoon"


def test_wrong_key_info_or_aad_fails():
    sk = X25519PrivateKey.generate()
    ct = hpke.seal(sk.public_key(), b"info", b"aad", b"secret")
    for args in [(X25519PrivateKey.generate(), b"info", b"aad"), (sk, b"other", b"aad"), (sk, b"info", b"x")]:
        with pytest.raises(EnvelopeError) as ei:
            hpke.open_(args[0], args[1], args[2], ct)
        assert ei.value.check == "decrypt"
