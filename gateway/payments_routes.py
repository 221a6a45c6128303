"""HTTP routes for channels and the ledger; the lead mounts ``payment_routes(gate)`` in the gateway app.

    GET  /v1/payments/operator      the operator's public key and payout address (to build a channel config)
    POST /v1/channels               register an opened channel {channel_id, key_a, address, caller, deposit}
    GET  /v1/channels/{id}          channel summary (seqno, sent, charged, reserved, credit)
    POST /v1/channels/{id}/close    the operator's close signature for {balance_a, balance_b, seqno_a, seqno_b}
    GET  /v1/ledger[?verify=1]      balances per party, optionally the verify report
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from cocoon_faas.errors import CocoonError, InvalidRequestError
from cocoon_faas.ton.keys import PrivateKey, PublicKey
from cocoon_faas.ton.messages import sign_close
from cocoon_faas.ton.wallet import Wallet

from .payments import PaymentGate


def payment_routes(gate: PaymentGate, operator_key: PrivateKey | None = None) -> list[BaseRoute]:
    def err(exc: CocoonError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise InvalidRequestError("body must be a JSON object") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("body must be a JSON object")
        return data

    async def operator(request: Request) -> JSONResponse:
        return JSONResponse({"public_key": gate.operator_key.hex(),
                             "address": Wallet(gate.operator_key).address.friendly()})

    async def register(request: Request) -> JSONResponse:
        try:
            d = await body(request)
            row = gate.ledger.add_channel(int(d["channel_id"]), PublicKey(bytes.fromhex(d["key_a"])),
                                          gate.operator_key, str(d["address"]), str(d.get("caller", "")),
                                          int(d["deposit"]))
            return JSONResponse(row.to_dict(), status_code=201)
        except CocoonError as exc:
            return err(exc)
        except (KeyError, ValueError, TypeError) as exc:
            return err(InvalidRequestError(f"bad channel registration ({exc}); send channel_id, key_a (hex), "
                                           "address, caller, deposit (nanoton)"))

    async def show(request: Request) -> JSONResponse:
        try:
            return JSONResponse(gate.channel_summary(int(request.path_params["cid"])))
        except CocoonError as exc:
            return err(exc)

    async def close(request: Request) -> JSONResponse:
        try:
            if operator_key is None:
                raise InvalidRequestError("this gateway has no operator signing key configured")
            cid = int(request.path_params["cid"])
            d = await body(request)
            ch = gate.ledger.channel(cid)
            bal_a, bal_b = int(d["balance_a"]), int(d["balance_b"])
            if bal_b != ch.charged or bal_a + bal_b != ch.deposit:
                raise InvalidRequestError(f"close must pay the operator exactly the charged {ch.charged} nanoton "
                                          f"and return {ch.deposit - ch.charged} to the caller")
            sig = sign_close(operator_key, cid, bal_a, bal_b, int(d["seqno_a"]), int(d["seqno_b"]))
            gate.ledger.set_status(cid, "closing")
            return JSONResponse({"signature_b": sig.hex()})
        except CocoonError as exc:
            return err(exc)

    async def ledger(request: Request) -> JSONResponse:
        out: dict[str, Any] = {"balances": gate.ledger.balances()}
        if request.query_params.get("verify"):
            out["verify"] = gate.ledger.verify()
        return JSONResponse(out)

    return [Route("/v1/payments/operator", operator), Route("/v1/channels", register, methods=["POST"]),
            Route("/v1/channels/{cid:int}", show), Route("/v1/channels/{cid:int}/close", close, methods=["POST"]),
            Route("/v1/ledger", ledger)]
