"""Confidential deployments: sealed code, key grants to attested replicas only, peer release."""

from __future__ import annotations

import copy

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cocoon_faas.confidential.document import ClientPolicy, dev_public_key_hex
from cocoon_faas.confidential.errors import CheckFailed, EnvelopeError
from cocoon_faas.confidential.keyrelease import grant_code_key, open_code, peek_sealed_code, seal_code
from cocoon_faas.confidential.replica import ReplicaIdentity

M = "c0" * 32
NOW = 1_780_000_000
BUNDLE = b"\x80\x05 cloudpickled function bytes MARKER-CODE"


@pytest.fixture()
def setup():
    dev = Ed25519PrivateKey.generate()
    policy = ClientPolicy.build([M], allow_dev_keys=[dev_public_key_hex(dev)])
    sealed, key = seal_code(BUNDLE, "embed", M, policy)
    return dev, policy, sealed, key


def _rep(dev, measurement=M):
    return ReplicaIdentity.create("embed", measurement, "0.1.0", dev_key=dev, now=NOW)


def test_sealed_code_hides_the_bundle_and_carries_the_policy(setup):
    dev, policy, sealed, key = setup
    assert b"MARKER-CODE" not in sealed
    hdr = peek_sealed_code(sealed)
    assert hdr.measurement == M and hdr.function == "embed"
    assert hdr.policy.trusted_dev_keys == policy.trusted_dev_keys and hdr.policy.measurements == {M}
    assert open_code(sealed, key) == BUNDLE


def test_grant_to_attested_replica_and_peer_release(setup):
    dev, _, sealed, key = setup
    a, b = _rep(dev), _rep(dev)
    grant, verified = grant_code_key(key, sealed, a.document, now=NOW + 1)
    assert verified.key_id == a.key_id and key not in grant
    assert a.open_code(sealed, grant) == BUNDLE
    with pytest.raises(EnvelopeError) as ei:
        b.open_code(sealed, grant)  # a grant is for one replica only
    assert ei.value.check == "key_id"
    assert b.open_code(sealed, a.peer_grant(sealed, b.document, now=NOW + 1)) == BUNDLE


def test_no_key_for_wrong_measurement_or_untrusted_evidence(setup):
    dev, _, sealed, key = setup
    with pytest.raises(CheckFailed) as ei:
        grant_code_key(key, sealed, _rep(dev, "ee" * 32).document, now=NOW + 1)
    assert ei.value.check == "measurement"
    with pytest.raises(CheckFailed) as ei:
        grant_code_key(key, sealed, _rep(Ed25519PrivateKey.generate()).document, now=NOW + 1)
    assert ei.value.check == "dev_key_untrusted"
    a = _rep(dev)
    with pytest.raises(EnvelopeError) as ei:
        a.peer_grant(sealed, _rep(dev).document, now=NOW + 1)  # holds no key yet
    assert ei.value.check == "no_code_key"


def test_tampered_policy_or_code_does_not_open(setup):
    dev, _, sealed, key = setup
    loosened = sealed.replace(b'"tee_kinds":["dev","tdx"]', b'"tee_kinds":["dev","tdx"]'.replace(b"tdx", b"sev"))
    assert loosened != sealed
    with pytest.raises(EnvelopeError):
        open_code(loosened, key)
    bad = bytearray(sealed)
    bad[-3] ^= 1
    with pytest.raises(EnvelopeError):
        open_code(bytes(bad), key)
    a = _rep(dev)
    grant, _ = grant_code_key(key, sealed, a.document, now=NOW + 1)
    g = bytearray(grant)
    g[-1] ^= 1
    with pytest.raises(EnvelopeError):
        a.open_code(sealed, bytes(g))
    doc = copy.deepcopy(a.document)
    doc["expires_at"] = NOW - 1
    with pytest.raises(CheckFailed):
        grant_code_key(key, sealed, doc, now=NOW + 1)
