"""Certificate chains to a pinned root, checked at a given time (Intel PCK chains, NVIDIA device chains).

The chain a quote or report carries may end in a root of its own; that root is never trusted. The last
non-root certificate must be issued by the pinned root, every certificate must be valid at `at`, and every
issuer must be a CA. Failures raise `CheckFailed` with the caller's check name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from cocoon_faas.confidential.errors import CheckFailed


def load_cert(data: bytes | str | Path) -> x509.Certificate:
    """A certificate from DER or PEM bytes, or from a file path."""
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_pem_chain(data: bytes | Sequence[bytes]) -> list[x509.Certificate]:
    if isinstance(data, bytes):
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_pem_x509_certificate(b) for b in data]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)


def check_validity(cert: x509.Certificate, at: datetime, check: str) -> None:
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise CheckFailed(
            check, f"certificate '{cert.subject.rfc4514_string()}' is not valid at {at.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}); "
            "pass the evaluation time with --at or refresh the evidence")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_chain(chain: Sequence[x509.Certificate], root: x509.Certificate, at: datetime,
                 check: str) -> x509.Certificate:
    """Verify `chain` (leaf first) up to the pinned `root` at time `at`; return the leaf."""
    certs = list(chain)
    while certs and (_same(certs[-1], root) or certs[-1].issuer == certs[-1].subject):
        certs.pop()  # a root shipped inside the evidence: ignored, the pinned one is used
    if not certs:
        raise CheckFailed(check, "the chain holds no certificate below the root")
    path = certs + [root]
    for cert, issuer in zip(path, path[1:], strict=False):
        if not _is_ca(issuer):
            raise CheckFailed(check, f"issuer '{issuer.subject.rfc4514_string()}' is not a CA certificate")
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CheckFailed(
                check, f"'{cert.subject.rfc4514_string()}' is not signed by '{issuer.subject.rfc4514_string()}'"
                f" ({type(exc).__name__}); the chain does not lead to the pinned root "
                f"(sha256 {fingerprint(root)[:16]}...)") from None
    for cert in path:
        check_validity(cert, at, check)
    return certs[0]
