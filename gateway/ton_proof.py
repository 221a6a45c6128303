"""TON Connect's ``ton_proof``: a wallet app proves, in the browser, that it controls a wallet address.

The page asks the gateway for a payload (a one-use secret), the wallet (Tonkeeper, MyTonWallet, ...) signs it in
its ``connect`` reply, the page posts that reply here. Per the TON Connect spec (requests-responses.md, "Address
proof signature") the wallet signs, with Ed25519 under its wallet key::

    sha256(0xffff ++ "ton-connect" ++ sha256("ton-proof-item-v2/" ++ workchain:uint32 BE ++ address hash:32
                                             ++ domain length:uint32 LE ++ domain ++ timestamp:uint64 LE
                                             ++ payload))

:meth:`TonProof.verify` makes every check of the backend guide (docs.ton.org, "Verifying signed-in users") that
needs no chain: the domain is one this gateway answers to, the timestamp within ``MAX_AGE_S``, the state_init's
hash is the address, the state_init is a standard wallet (v3R1, v3R2, v4R2, v5R1, by code hash) whose data holds
``public_key``, and the signature verifies under that key for that standard wallet (the same
:func:`~cocoon_faas.runtime.registration.check_wallet_signature` a node's registration and the CLI login pass).
The payload (issued, unused, unexpired; used once) and "the wallet has nodes here" are the route's checks
(gateway/dashboard_provider.py), since they read the gateway's state. Nothing here reads a chain: a wallet
deployed with another key since (v5R1's key rotation through an extension) is judged by its state_init.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from pytoniq_core import Cell

from cocoon_faas.errors import AuthenticationError, CocoonError, InvalidRequestError, PermissionDeniedError
from cocoon_faas.runtime.registration import check_wallet_signature
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.wallet import MAINNET, TESTNET, WALLET_CODES, version_of_code

PREFIX = b"ton-proof-item-v2/"
MAX_AGE_S = 15 * 60  # the spec's guide: a proof signed more than 15 minutes away from now is refused
MAX_STATE_INIT = 4096  # bytes of BOC; a standard wallet's state_init is under 1 KiB
MAX_TEXT = 256  # payload, domain, address: more is not a TON Connect reply


def proof_message(address: Address, domain: str, timestamp: int, payload: str) -> bytes:
    """The 32 bytes the wallet key signs (module docstring)."""
    d = domain.encode()
    inner = (PREFIX + struct.pack(">i", address.workchain) + address.hash + struct.pack("<I", len(d)) + d
             + struct.pack("<Q", timestamp) + payload.encode())
    return hashlib.sha256(b"\xff\xff" + b"ton-connect" + hashlib.sha256(inner).digest()).digest()


def wallet_of_state_init(state_init: Cell) -> tuple[str, bytes]:
    """(version, public key) of a standard wallet's StateInit; InvalidRequestError naming why it is not one."""
    try:
        s = state_init.begin_parse()
        plain = s.remaining_bits == 5 and s.load_uint(5) == 0b00110 and len(state_init.refs) == 2
    except Exception:  # noqa: BLE001 - any malformed cell is a refusal, not a 500
        plain = False
    if not plain:
        raise InvalidRequestError("proof.state_init is not a StateInit{code, data} (no split_depth, special or "
                                  "library); send the walletStateInit your wallet's connect reply carries")
    code, data = state_init.refs
    version = version_of_code(code.hash)
    if version is None:
        raise InvalidRequestError(f"proof.state_init's code (hash {code.hash.hex()}) is not a standard wallet "
                                  f"this gateway knows ({', '.join(sorted(WALLET_CODES))}); connect a standard "
                                  "wallet")
    try:
        d = data.begin_parse()
        if version == "v5r1":
            d.skip_bits(1 + 32 + 32)  # is_signature_allowed, seqno, wallet_id
        else:
            d.skip_bits(32 + 32)  # seqno, subwallet_id
        return version, d.load_bytes(32)
    except Exception:  # noqa: BLE001
        raise InvalidRequestError(f"proof.state_init's data is too short for a {version} wallet") from None


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
        raise InvalidRequestError(f"{what} must be a non-empty string of at most {MAX_TEXT} characters")
    return v


def _b64(v: Any, what: str, limit: int) -> bytes:
    if not isinstance(v, str) or len(v) > limit * 4 // 3 + 4:
        raise InvalidRequestError(f"{what} must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(v.replace("-", "+").replace("_", "/") + "=" * (-len(v) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not base64") from None


@dataclass(frozen=True)
class TonProof:
    """A wallet's ``connect`` reply with ``ton_proof``, as a TON Connect frontend posts it (see from_wire)."""

    address: Address
    network: int
    public_key: bytes
    timestamp: int
    domain: str
    payload: str
    signature: bytes
    state_init: Cell

    @classmethod
    def from_wire(cls, body: Any) -> TonProof:
        """``{"address", "network", "public_key", "proof": {"timestamp", "domain": {"lengthBytes", "value"},
        "payload", "signature", "state_init"}}``; checks shapes (never raises but InvalidRequestError)."""
        if not isinstance(body, dict) or not isinstance(body.get("proof"), dict):
            raise InvalidRequestError('expected {"address", "network", "public_key", "proof": {"timestamp", '
                                      '"domain", "payload", "signature", "state_init"}} from a TON Connect reply')
        p = body["proof"]
        try:
            address = Address.parse(_text(body.get("address"), "address"))
        except CocoonError as exc:
            raise InvalidRequestError(f"address: {exc.message}") from None
        network = str(body.get("network"))
        if network not in (str(MAINNET), str(TESTNET)):
            raise InvalidRequestError(f'network must be "{MAINNET}" (mainnet) or "{TESTNET}" (testnet)')
        try:
            public_key = bytes.fromhex(_text(body.get("public_key"), "public_key"))
        except ValueError:
            public_key = b""
        if len(public_key) != 32:
            raise InvalidRequestError("public_key must be the wallet's 32-byte Ed25519 key, hex-encoded")
        ts = p.get("timestamp")
        if isinstance(ts, str) and ts.isdigit() and len(ts) <= 20:
            ts = int(ts)  # the spec's wire form is a decimal string; the SDKs hand over a number
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**64:
            raise InvalidRequestError("proof.timestamp must be the signing time in Unix seconds")
        dom = p.get("domain")
        if not isinstance(dom, dict):
            raise InvalidRequestError('proof.domain must be {"lengthBytes": n, "value": "<host>"}')
        domain = _text(dom.get("value"), "proof.domain.value")
        if dom.get("lengthBytes") != len(domain.encode()):
            raise InvalidRequestError("proof.domain.lengthBytes is not the UTF-8 length of proof.domain.value")
        payload = _text(p.get("payload"), "proof.payload")
        signature = _b64(p.get("signature"), "proof.signature", 64)
        if len(signature) != 64:
            raise InvalidRequestError("proof.signature must be a 64-byte Ed25519 signature, base64-encoded")
        boc = _b64(p.get("state_init", body.get("state_init")), "proof.state_init", MAX_STATE_INIT)
        try:
            state_init = Cell.one_from_boc(boc)
        except Exception:  # noqa: BLE001 - the BOC parser raises many types on garbage; all are the sender's
            raise InvalidRequestError("proof.state_init is not a bag of cells; send the walletStateInit of "
                                      "your wallet's connect reply") from None
        return cls(address, int(network), public_key, ts, domain, payload, signature, state_init)

    def message(self) -> bytes:
        return proof_message(self.address, self.domain, self.timestamp, self.payload)

    def verify(self, hosts: set[str] | frozenset[str], now: float, max_age: float = MAX_AGE_S) -> str:
        """Raise unless the proof holds for a gateway reached as one of ``hosts`` (host[:port]); returns the
        wallet version. Touches no state."""
        allowed = hosts | {h.rsplit(":", 1)[0] for h in hosts if not h.endswith("]")}  # with or without the port
        if self.domain not in allowed:
            raise PermissionDeniedError(f"this proof was signed for {self.domain!r}, not for this gateway "
                                        f"({', '.join(sorted(hosts))}); log in from the dashboard this gateway "
                                        "serves", reason="domain")
        if now - self.timestamp > max_age:
            raise AuthenticationError(f"this proof was signed {now - self.timestamp:.0f}s ago (at most "
                                      f"{max_age:.0f}s); log in again", reason="stale")
        if self.timestamp - now > max_age:
            raise AuthenticationError(f"this proof is dated {self.timestamp - now:.0f}s in the future; set the "
                                      "wallet device's clock and log in again", reason="future")
        if self.state_init.hash != self.address.hash:
            raise AuthenticationError(f"proof.state_init is not the initial state of {self.address.raw} (its hash "
                                      "is another address); send the address and walletStateInit of the same "
                                      "wallet", reason="address")
        version, key = wallet_of_state_init(self.state_init)
        if key != self.public_key:
            raise AuthenticationError(f"public_key is not the key in the wallet's state_init (a {version} wallet "
                                      "of another key); send the publicKey of the connected wallet",
                                      reason="public_key")
        check_wallet_signature(
            self.public_key.hex(), self.address.raw, version, self.message(), self.signature,
            bad_signature="ton_proof signature does not verify under the wallet's key (forged, or signed over "
                          "other fields); log in again from the dashboard",
            not_owner="wallet {wallet} is not the standard {version} wallet of its key (another subwallet id); "
                      "log in with the wallet your nodes joined with")
        return version
