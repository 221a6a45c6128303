"""Billing around each call: hold before dispatch, charge the metered cost after, sign a receipt.

A call with `X-Cocoon-Payment` is paid from the caller's channel: `PaymentGate.authorize` makes the state and the
hold durable before the call is dispatched; afterwards the metered cost (replica execution seconds × the
provider's price per second for the function's resources) plus the developer's royalty plus the operator fee is
charged in one transaction, never above the hold. Failed calls (platform fault, timeout, replica death,
cancellation) are released, not charged; the user's own exception is charged for the time it used.
"""

from __future__ import annotations

import json
import math
import os
from binascii import b2a_base64
from typing import Any

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

from cocoon_faas.errors import PaymentRequiredError
from cocoon_faas.gateway.db import Database
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import FeePolicy, Hold, PaymentGate
from cocoon_faas.gateway.watchtower import Watchtower
from cocoon_faas.pricing import Price, Usage, compute_cost
from cocoon_faas.settings import Settings
from cocoon_faas.spec import FunctionSpec
from cocoon_faas.ton.chain import backend_from_settings
from cocoon_faas.ton.closing import ClosingTerms
from cocoon_faas.ton.keys import PrivateKey

PAYMENT_HEADER = "x-cocoon-payment"
# what json.dumps(receipt, sort_keys=True, separators=(",", ":")) builds per call, made once
_RECEIPT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_json_str = json.encoder.encode_basestring_ascii  # the encoder's own string escaping (ensure_ascii)


def _json_num(v: Any) -> str:
    """A number as _RECEIPT_JSON writes it (int.__repr__, float.__repr__ when finite), else the encoder itself."""
    t = type(v)
    if t is int or (t is float and math.isfinite(v)):
        return repr(v)
    return _RECEIPT_JSON.encode(v)


def receipt_payload(hold: Hold, measurement: str, exec_ms: float, charge: int, provider: str,
                    usage: Usage | None) -> bytes:
    """The receipt's JSON, byte for byte `_RECEIPT_JSON.encode(receipt dict)` (keys in sorted order) without
    building the dict and walking it: this runs on every paid call (tests compare both on random receipts)."""
    tail = "}" if usage is None else ',"usage":' + _RECEIPT_JSON.encode(usage.to_json()) + "}"
    return (f'{{"call_id":{_json_str(hold.call_id)},"channel_id":{_json_num(hold.channel_id)},'
            f'"charge":{_json_num(charge)},"exec_ms":{_json_num(exec_ms)},"function":{_json_str(hold.function)},'
            f'"measurement":{_json_str(measurement)},"provider":{_json_str(provider)},'
            f'"seqno":{_json_num(hold.seqno)}{tail}').encode()


def load_operator_key(settings: Settings) -> PrivateKey:
    """The operator's Ed25519 key (channel party B, receipt signer), created on first start (0600)."""
    f = settings.home / "operator_key"
    if f.exists():
        return PrivateKey.from_bytes(bytes.fromhex(f.read_text().strip()))
    key = PrivateKey.generate()
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.to_bytes().hex() + "\n")
    return key


class Billing:
    """The gateway's payment hook: `begin` before dispatch, `finish` after."""

    def __init__(self, settings: Settings, gateway_id: str | None = None, db: Database | None = None) -> None:
        self.settings = settings
        self.operator_key = load_operator_key(settings)
        self._receipt_sk = crypto_sign_seed_keypair(self.operator_key.to_bytes())[1]
        # PostgreSQL: the store's pool serves the ledger too; SQLite: the ledger keeps its own file
        self.ledger = Ledger(db if db is not None else settings.home / "ledger.db", home=settings.home)
        self.chain = backend_from_settings(settings)
        self.gate = PaymentGate(self.ledger, self.operator_key, FeePolicy(bps=settings.operator_fee_bps),
                                chain=self.chain, gateway_id=gateway_id,
                                terms=ClosingTerms(settings.channel_quarantine_s, settings.channel_conditional_close_s,
                                                   settings.channel_fine_bps))
        self.watchtower = Watchtower(self.ledger, self.chain, self.operator_key, settings.watchtower_interval_s)
        self.local_price = Price(settings.cpu_price_nanoton, settings.gpu_price_nanoton)

    def price_for(self, provider: str) -> Price:
        """The provider's price; the marketplace overrides this when providers have joined."""
        return self.local_price

    def max_cost(self, spec: FunctionSpec, provider: str | None = None, units: int = 1) -> int:
        """The most one call can cost: the whole time limit at the highest price (per-token functions: the
        token limits at their prices), plus royalty and fee; `units` replica calls in one request."""
        tokens = spec.token_prices
        if tokens is not None:
            compute = tokens.max_cost() * units
        else:
            compute = math.ceil(spec.timeout * self.price_for(provider or "any").per_second(spec)) * units
        return compute + spec.price + self.gate.fees.fee(compute, spec.price)

    def quote(self, spec: FunctionSpec) -> dict[str, Any]:
        p = self.price_for("local")
        q: dict[str, Any] = {"max_cost_nanoton": self.max_cost(spec), "royalty_nanoton": spec.price,
                             "cpu_price_nanoton_per_s": p.cpu_per_s, "gpu_price_nanoton_per_s": p.gpu_per_s,
                             "operator_fee_bps": self.gate.fees.bps}
        if spec.token_prices is not None:
            q["per_token"] = {"prompt_nanoton_per_million": spec.token_prices.prompt_per_million,
                              "completion_nanoton_per_million": spec.token_prices.completion_per_million}
        return q

    def begin(self, headers: Any, function: str, spec: FunctionSpec, call_id: str, units: int = 1) -> Hold | None:
        """Verify and persist the caller's state and hold; None when the call carries no payment."""
        value = headers.get(PAYMENT_HEADER)
        if value is None:
            if self.settings.payments_required:
                raise PaymentRequiredError(
                    f"calls to {function!r} must be paid: open a channel with `cocoon channel open --deposit 5` "
                    "and send X-Cocoon-Payment", needed=self.max_cost(spec, units=units))
            return None
        return self.gate.authorize(value, call_id, function, self.max_cost(spec, units=units))

    def compute(self, spec: FunctionSpec, provider: str, exec_ms: float, usage: Usage | None) -> int:
        """The provider's part: per token when the function declares token prices and reported its usage,
        else per second of metered execution at the provider's price."""
        tokens = spec.token_prices
        if tokens is not None and usage is not None:
            return tokens.cost(usage)
        return compute_cost(exec_ms, self.price_for(provider).per_second(spec))

    def finish(self, hold: Hold, spec: FunctionSpec, developer: str, provider: str, exec_ms: float,
               bill: bool, measurement: str, usage: Usage | None = None) -> tuple[int, str | None]:
        """Charge (`bill`) or release the hold; (charge, signed receipt)."""
        if not bill:
            self.gate.release(hold)
            return 0, None
        total = self.gate.settle(hold, provider, self.compute(spec, provider, exec_ms, usage), developer,
                                 spec.price)
        payload = receipt_payload(hold, measurement, exec_ms, total, provider, usage)
        sig = crypto_sign(payload, self._receipt_sk)[:64]  # libsodium: the operator key's Ed25519 signature
        return total, (b2a_base64(payload, newline=False) + b"." + b2a_base64(sig, newline=False)).decode()
