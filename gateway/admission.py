"""Who may join the cluster as a provider node (``COCOON_PROVIDER_ADMISSION``).

A Ray cluster is one trust domain: a member can run code on every node, the head (the operator's keys) included.
So joining is the most sensitive thing the gateway grants, and it is granted in one of three modes:

- ``attested``: the registration carries an attestation document (runtime/node_attestation.py) that the
  gateway's policy accepts: the worker measurement is one it allows, the evidence verifies (a TDX quote, or a
  development key the operator listed in ``COCOON_PROVIDER_DEV_KEYS``), the document names the registering
  wallet, and the wallet signed the document's key id. The secrets (session token, Ray address and token) go back
  sealed to the key in that document, never in the clear. The default whenever the gateway listens beyond
  loopback.
- ``approved``: the operator lists wallets (``cocoon provider approve|revoke WALLET``); others get 403.
- ``open``: anyone; for loopback development only, and logged as insecure at start-up.

In every mode a revoked wallet is refused, prices are bounded by ``COCOON_MAX_PRICE_NANOTON`` and hardware claims
must be plausible (what a node really has is checked again against its Ray node once it is up: see
``Marketplace.sync_ray_nodes``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cocoon_faas.confidential.document import ClientPolicy, verify_document
from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.errors import InvalidRequestError, PermissionDeniedError
from cocoon_faas.runtime.hardware import GIB
from cocoon_faas.runtime.node_attestation import NODE_FUNCTION, worker_measurement
from cocoon_faas.runtime.registration import Registration

log = logging.getLogger("cocoon.admission")

ATTESTED, APPROVED, OPEN = "attested", "approved", "open"
MAX_CPUS, MAX_GPUS, MAX_MEMORY = 4096, 64, 64 * 1024 * GIB  # beyond any one machine: a claim past these is a lie


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_mode(setting: str, host: str) -> str:
    """``auto``: attested unless the gateway listens on loopback only (a development setup), then open. ``open``
    on a non-loopback address is refused: that is the attack this module exists to stop."""
    if setting == "auto":
        return OPEN if is_loopback(host) else ATTESTED
    if setting == OPEN and not is_loopback(host):
        raise InvalidRequestError(f"COCOON_PROVIDER_ADMISSION=open is for loopback development only, and the "
                                  f"gateway listens on {host}; use attested or approved")
    return setting


def wallet_key(wallet: str) -> str:
    """One spelling per wallet (raw form), whichever form the operator or the node used."""
    from cocoon_faas.ton.address import Address

    try:
        return Address.parse(wallet.strip()).raw
    except (InvalidRequestError, ValueError) as exc:
        raise InvalidRequestError(f"{wallet!r} is not a TON wallet address ({exc}); pass the address the "
                                  "provider registers with") from None


class WalletBook(Protocol):
    """Where the operator's decisions on wallets live (the gateway's store)."""

    def wallet_status(self, wallet: str) -> str | None: ...

    def set_wallet_status(self, wallet: str, status: str) -> None: ...

    def wallet_statuses(self) -> list[tuple[str, str, float]]: ...


@dataclass(frozen=True)
class Admitted:
    """A registration the gateway accepted: ``sealing_key`` is the attested node's HPKE key (attested mode)."""

    mode: str
    sealing_key: bytes | None = None


class Admission:
    """The admission decision for one registration (pure: approvals and the clock are passed in)."""

    def __init__(self, mode: str, *, status_of: Callable[[str], str | None], max_price: int,
                 measurements: Iterable[str] | None = None, dev_keys: Iterable[str] = ()) -> None:
        if mode not in (ATTESTED, APPROVED, OPEN):
            raise ValueError(f"unknown admission mode {mode!r}")
        self.mode = mode
        self.status_of = status_of  # wallet (raw form) -> "approved" | "revoked" | None
        self.max_price = max_price
        self.measurements = frozenset(m.lower() for m in (measurements or [worker_measurement()]))
        self.dev_keys = frozenset(k.strip().lower() for k in dev_keys if k.strip())

    def check(self, reg: Registration, attestation: Any, now: float) -> Admitted:
        """Raise 400 (bad claims) or 403 (not admitted, naming the mode and the fix); otherwise admitted."""
        self._check_claims(reg)
        wallet = wallet_key(reg.wallet)
        status = self.status_of(wallet)
        if status == "revoked":
            raise PermissionDeniedError(f"wallet {reg.wallet} was revoked by the gateway operator; ask them to "
                                        "`cocoon provider approve` it again")
        if self.mode == OPEN:
            return Admitted(OPEN)
        if self.mode == APPROVED:
            if status != "approved":
                raise PermissionDeniedError(
                    f"this gateway admits approved providers only (COCOON_PROVIDER_ADMISSION=approved) and wallet "
                    f"{reg.wallet} is not approved; ask the operator to run `cocoon provider approve {reg.wallet}`")
            return Admitted(APPROVED)
        return Admitted(ATTESTED, self._attested_key(reg, attestation, now))

    def _attested_key(self, reg: Registration, doc: Any, now: float) -> bytes:
        fix = ("run the platform's worker image in a TEE and join with `cocoon provider join` (it attaches the "
               "evidence), or ask the operator to trust your development key in COCOON_PROVIDER_DEV_KEYS")
        if not isinstance(doc, dict):
            raise PermissionDeniedError("this gateway admits attested providers only (COCOON_PROVIDER_ADMISSION="
                                        f"attested) and the registration carries no attestation; {fix}")
        policy = ClientPolicy.build(sorted(self.measurements), allow_dev_keys=sorted(self.dev_keys),
                                    function=NODE_FUNCTION)
        try:
            verified = verify_document(doc, policy, now=now)
        except CheckFailed as exc:
            raise PermissionDeniedError(f"the node's attestation was refused ({exc}); {fix}") from None
        if verified.receipt_public_key.hex() != reg.public_key:
            raise PermissionDeniedError("the attestation document names another wallet key than the "
                                        "registration's; attest this node with its own wallet key")
        if not reg.attestation_kid or reg.attestation_kid != verified.key_id:
            raise PermissionDeniedError("the signed registration does not name the attested key "
                                        "(attestation_kid); join with `cocoon provider join`")
        return verified.hpke_public_key

    def _check_claims(self, reg: Registration) -> None:
        for what, price in (("GPU", reg.gpu_price), ("CPU", reg.cpu_price)):
            if price > self.max_price:
                raise InvalidRequestError(
                    f"{what} price {price} nanoton per second is over this gateway's limit of {self.max_price} "
                    "(COCOON_MAX_PRICE_NANOTON); ask less")
        hw = reg.hardware
        if hw.cpus > MAX_CPUS or hw.gpu_count > MAX_GPUS or hw.memory > MAX_MEMORY:
            raise InvalidRequestError(
                f"hardware claim ({hw.cpus} CPUs, {hw.gpu_count} GPUs, {hw.memory // GIB} GiB) is beyond any one "
                f"machine (at most {MAX_CPUS} CPUs, {MAX_GPUS} GPUs, {MAX_MEMORY // GIB} GiB); declare what the "
                "machine has")


def startup_warning(mode: str) -> str | None:
    if mode == OPEN:
        return ("INSECURE: COCOON_PROVIDER_ADMISSION=open: any process that can reach this gateway may join its "
                "Ray cluster and run code on every node, this one included. Loopback development only.")
    return None
