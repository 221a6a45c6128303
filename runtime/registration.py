"""A provider's signed registration: proof that whoever registers a node controls the wallet paid for it.

Wire form (JSON)::

    {"registration": {wallet, wallet_version, public_key, name, hardware, gpu_price, cpu_price, timestamp,
                      nonce[, attestation_kid]},
     "signature": "<hex Ed25519 signature>"[, "attestation": {attestation document}]}

The signature covers ``DOMAIN + canonical_json(registration)`` (sorted keys, no spaces, UTF-8), so it cannot be
replayed as another message type. The gateway checks, in order: the signature under ``public_key``; that
``public_key`` owns ``wallet`` (the address of the standard wallet contract of that key and version, see
:mod:`cocoon_faas.ton.wallet`); that ``timestamp`` is within ``MAX_SKEW_S`` of its clock; and that the nonce was
not seen in that window. Prices are nanoton per GPU-second and per CPU-second.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cocoon_faas.errors import AuthenticationError, InvalidRequestError
from cocoon_faas.runtime.hardware import Hardware

DOMAIN = b"cocoon-provider-registration-v1\n"
MAX_SKEW_S = 300


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def wallet_owner_matches(wallet: str, public_key: bytes, version: str) -> bool:
    """Is ``wallet`` the address of the standard ``version`` wallet of ``public_key`` (any workchain; a v5R1
    wallet's id names its network, so either network's)?"""
    from cocoon_faas.ton.address import Address
    from cocoon_faas.ton.keys import PublicKey
    from cocoon_faas.ton.wallet import MAINNET, TESTNET, Wallet

    addr = Address.parse(wallet)
    networks = (MAINNET, TESTNET) if version.lower() == "v5r1" else (MAINNET,)
    return any(Wallet(PublicKey(public_key), version=version, workchain=addr.workchain, network=n).address == addr
               for n in networks)


def check_wallet_signature(public_key: str, wallet: str, wallet_version: str, message: bytes, signature: bytes, *,
                           bad_signature: str, not_owner: str) -> None:
    """Raise AuthenticationError unless ``signature`` over ``message`` verifies under ``public_key`` (hex) and that
    key owns ``wallet``; the two messages say what to do (``not_owner`` may name ``{wallet}`` and ``{version}``)."""
    from cocoon_faas.ton.keys import PublicKey

    if not PublicKey(bytes.fromhex(public_key)).is_valid(signature, message):
        raise AuthenticationError(bad_signature)
    try:
        owns = wallet_owner_matches(wallet, bytes.fromhex(public_key), wallet_version)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"wallet {wallet!r}: {exc.message}") from None
    if not owns:
        raise AuthenticationError(not_owner.format(wallet=wallet, version=wallet_version))


MAX_NAME = 128  # characters of a node's name


@dataclass(frozen=True)
class Registration:
    """What a provider node offers and asks, as signed by its wallet key."""

    wallet: str
    wallet_version: str
    public_key: str  # hex, 32 bytes
    name: str
    hardware: Hardware
    gpu_price: int
    cpu_price: int
    timestamp: int
    nonce: str
    attestation_kid: str = ""  # key id of the node's attestation document (runtime/node_attestation.py)

    @classmethod
    def new(cls, *, wallet: str, public_key: bytes, name: str, hardware: Hardware, gpu_price: int,
            cpu_price: int = 0, wallet_version: str = "v3r2", now: float | None = None,
            attestation_kid: str = "") -> Registration:
        return cls(wallet, wallet_version, public_key.hex(), name, hardware, int(gpu_price), int(cpu_price),
                   int(time.time() if now is None else now), secrets.token_hex(16), attestation_kid)

    @property
    def node_id(self) -> str:
        """Stable per (key, machine name): a re-join after a restart keeps the id, its earnings and replicas."""
        return hashlib.sha256(bytes.fromhex(self.public_key) + self.name.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = {"wallet": self.wallet, "wallet_version": self.wallet_version, "public_key": self.public_key,
             "name": self.name, "hardware": self.hardware.to_dict(), "gpu_price": self.gpu_price,
             "cpu_price": self.cpu_price, "timestamp": self.timestamp, "nonce": self.nonce}
        if self.attestation_kid:  # signed with the rest: the wallet vouches for this attested key
            d["attestation_kid"] = self.attestation_kid
        return d

    def message(self) -> bytes:
        return DOMAIN + canonical_json(self.to_dict())

    def signed(self, sign: Any, attestation: dict[str, Any] | None = None) -> dict[str, Any]:
        """The wire form; ``sign`` is a PrivateKey (``.sign(bytes) -> bytes``); ``attestation`` the node's
        attestation document, sent beside the signed part (it is bound by its own evidence)."""
        wire = {"registration": self.to_dict(), "signature": sign.sign(self.message()).hex()}
        if attestation is not None:
            wire["attestation"] = attestation
        return wire

    @classmethod
    def from_wire(cls, body: Any) -> tuple[Registration, bytes]:
        """Parse the wire form into (registration, signature); checks types and ranges, not the signature."""
        if not isinstance(body, dict) or not isinstance(body.get("registration"), dict):
            raise InvalidRequestError('expected {"registration": {...}, "signature": "<hex>"}')
        r = body["registration"]
        try:
            reg = cls(str(r["wallet"]), str(r.get("wallet_version", "v3r2")), str(r["public_key"]),
                      str(r.get("name", "")), Hardware.from_dict(r["hardware"]), int(r["gpu_price"]),
                      int(r.get("cpu_price", 0)), int(r["timestamp"]), str(r["nonce"]),
                      str(r.get("attestation_kid", "")))
            sig = bytes.fromhex(str(body.get("signature", "")))
            pk = bytes.fromhex(reg.public_key)
        except KeyError as exc:
            raise InvalidRequestError(f"registration lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"registration is malformed: {exc}") from None
        if len(pk) != 32 or len(sig) != 64:
            raise InvalidRequestError("public_key must be 32 bytes and signature 64 bytes, hex-encoded")
        if reg.gpu_price < 0 or reg.cpu_price < 0:
            raise InvalidRequestError("prices must be >= 0 nanoton per second")
        if not 8 <= len(reg.nonce) <= 64:
            raise InvalidRequestError("nonce must be 8 to 64 characters")
        # refused, not cut: the signature covers the whole name, so a cut one read as a forged registration
        if not reg.name.isprintable():  # shown on the operator's terminal and page: no escapes, no line breaks
            raise InvalidRequestError("node name must be printable text (no control characters or line breaks); "
                                      "join with a plain --name")
        if len(reg.name) > MAX_NAME:
            raise InvalidRequestError(f"node name is {len(reg.name)} characters, at most {MAX_NAME}; join with a "
                                      "shorter --name")
        if len(reg.attestation_kid) > 64:
            raise InvalidRequestError("attestation_kid must be at most 64 characters")
        return reg, sig

    def verify(self, signature: bytes, now: float, max_skew: float = MAX_SKEW_S) -> None:
        """Raise AuthenticationError unless the signature, wallet ownership and freshness all hold."""
        check_wallet_signature(
            self.public_key, self.wallet, self.wallet_version, self.message(), signature,
            bad_signature="registration signature does not verify under public_key; sign it with the wallet's key",
            not_owner="public_key does not own wallet {wallet} (as a {version} wallet); pass the wallet's own key "
                      "or its version with --wallet-version")
        if abs(now - self.timestamp) > max_skew:
            raise AuthenticationError(f"registration timestamp is {now - self.timestamp:+.0f}s off the gateway "
                                      "clock; sync the clock (NTP) and join again")
