"""HTTP routes for channels and the ledger; the gateway mounts ``payment_routes(gate, operator_key)``.

    GET  /v1/payments/operator[?channel_id=N]   the operator's public key, payout address and closing terms (to
                                    build a channel config); with channel_id also `exit_state`: the operator's signed
                                    seqno-0 state of that channel, the caller's key to a forced close of its own
    POST /v1/channels               register a channel opened on chain {channel_id, key_a, dest_a[, address, deposit,
                                    closing: {quarantine_s, conditional_close_s, fine}]}
    GET  /v1/channels/{id}          channel summary (seqno, sent, charged, reserved, credit, latest_state)
    POST /v1/channels/{id}/close    the operator's close signature; the caller proves itself with signature_a
    GET  /v1/ledger[?verify=1]      operator only: balances per party and closes, optionally the verify report
                                    (with the watchtower: each close's booked payout checked against the chain)
    GET  /v1/ledger/calls/{id}      operator only: one paid call and its charge
    GET  /v1/ledger/providers       operator only: per provider earned, paid out, due
    POST /v1/ledger/providers/{id}/payout   operator only: pay what is due through the operator's channel to the
                                    provider {public_key, wallet[, amount, deposit]} -> the signed state
    POST /v1/ledger/channels/{id}/close     operator only: start a forced close of a caller's channel with the
                                    state covering its charges (the watchtower finishes it after the quarantine)

Registration trusts nothing the caller claims: keys, deposit and committed seqno come from the settlement chain
(`PaymentGate.register`). The operator is the gateway's ``default`` developer, whose API key `cocoon serve` writes
to ``$COCOON_HOME/api_key`` on the gateway machine (any key created for that developer works too).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from cocoon_faas.errors import (
    AuthenticationError,
    CocoonError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.closing import closing_from_dict, operator_exit_state
from cocoon_faas.ton.keys import PrivateKey, PublicKey
from cocoon_faas.ton.messages import CooperativeClose, sign_close
from cocoon_faas.ton.wallet import Wallet

from .http import developer_of, read_json
from .ledger import MAX_INT as MAX_NANOTON  # amounts are stored in the ledger's integer columns
from .payments import PaymentGate, provider_earnings
from .payouts import PayoutChannels, payout_channels_of
from .watchtower import Watchtower

OPERATOR_DEVELOPER = "default"
MAX_BODY = 64 * 1024  # channel registrations and closes are a few hundred bytes


def gateway_operator(request: Request) -> bool:
    """True when the request carries an API key of the gateway's default developer (401 without a key)."""
    gw = getattr(request.app.state, "gw", None)
    if gw is None:
        return False
    return developer_of(request) == gw.store.developer_id(OPERATOR_DEVELOPER)


def _nanoton(body: dict[str, Any], name: str) -> int | None:
    """An optional amount of nanoton in a JSON body: a whole number, more than 0, that the ledger can store."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_NANOTON:
        raise InvalidRequestError(f"{name} must be a whole number of nanoton from 1 to {MAX_NANOTON}, got {v!r} "
                                  "(1 TON = 10**9 nanoton)")
    return v


def payment_routes(gate: PaymentGate, operator_key: PrivateKey | None = None,
                   is_operator: Callable[[Request], bool] = gateway_operator,
                   watchtower: Watchtower | None = None,
                   registered: Callable[[str], tuple[str, str] | None] = lambda node_id: None) -> list[BaseRoute]:
    """``registered`` gives a provider node's (wallet, public key hex) as it registered, None when unknown here:
    a payout to a known node goes to that wallet and key only."""
    def err(exc: CocoonError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    def require_operator(request: Request) -> None:
        try:
            allowed = is_operator(request)
        except AuthenticationError as exc:
            raise AuthenticationError(f"the ledger is for the gateway operator: {exc.message}") from None
        if not allowed:
            raise PermissionDeniedError("the ledger is for the gateway operator; send the API key in the gateway's "
                                        "$COCOON_HOME/api_key")

    async def body(request: Request) -> dict[str, Any]:
        data = await read_json(request, MAX_BODY)
        if not isinstance(data, dict):
            raise InvalidRequestError("body must be a JSON object")
        return data

    async def operator(request: Request) -> JSONResponse:
        out: dict[str, Any] = {"public_key": gate.operator_key.hex(),
                               "address": Wallet(gate.operator_key).address.friendly(),
                               "closing": gate.terms.to_dict()}
        raw = request.query_params.get("channel_id")
        if raw is not None:
            try:
                cid = int(raw)
                if not 0 <= cid < 2**128:
                    raise ValueError
            except ValueError:
                return err(InvalidRequestError(f"channel_id {raw!r} is not a uint128 channel id"))
            if operator_key is None:
                return err(ConflictError("this gateway has no operator signing key to sign an exit state with"))
            out["exit_state"] = base64.b64encode(operator_exit_state(operator_key, cid).to_boc()).decode()
        return JSONResponse(out)

    async def register(request: Request) -> JSONResponse:
        try:
            d = await body(request)
            dep = d.get("deposit")
            closing = d.get("closing")
            if closing is not None and not isinstance(closing, dict):
                raise InvalidRequestError("closing must be {quarantine_s, conditional_close_s, fine}")
            row = gate.register(int(d["channel_id"]), PublicKey(bytes.fromhex(d["key_a"])),
                                Address.parse(str(d["dest_a"])), d.get("address"),
                                None if dep is None else int(dep), closing_from_dict(closing))
            return JSONResponse(row.to_dict(), status_code=201)
        except CocoonError as exc:
            return err(exc)
        except (KeyError, ValueError, TypeError) as exc:
            return err(InvalidRequestError(f"bad channel registration ({exc!r}); send channel_id, key_a (hex), "
                                           "dest_a (the caller's wallet address), optionally address and deposit"))

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
            try:
                args = (cid, int(d["balance_a"]), int(d["balance_b"]), int(d["seqno_a"]), int(d["seqno_b"]))
                sig_a = bytes.fromhex(str(d["signature_a"]))
                if not (all(0 <= v <= MAX_NANOTON for v in args[1:3]) and all(0 <= v < 2**64 for v in args[3:])):
                    raise ValueError("out of range")  # balances the ledger stores, seqnos of 64 bits
            except (KeyError, ValueError, TypeError):
                raise InvalidRequestError("send balance_a, balance_b (nanoton), seqno_a, seqno_b (below 2**64) and "
                                          "signature_a (hex, the caller's signature of the cooperative close)"
                                          ) from None
            ch = gate.ledger.channel(cid)
            if not ch.key_a.is_valid(sig_a, CooperativeClose.payload(*args).hash):
                raise PermissionDeniedError(f"signature_a does not verify with channel {cid}'s payer key; only the "
                                            "caller may close its channel")

            def idle(ch: Any, reserved: int) -> None:  # under the channel's row lock: no hold can slip in
                if ch.status not in ("open", "closing"):
                    raise ConflictError(f"channel {cid} is {ch.status}: a forced close is under way or done on "
                                        "chain, so a cooperative close no longer applies; `cocoon channel show` "
                                        "says when `cocoon channel finish` becomes possible")
                if reserved:
                    raise ConflictError(f"channel {cid} has calls in flight; close it when they have finished")
                if args[2] != ch.charged or args[1] + args[2] != ch.deposit:
                    raise InvalidRequestError(f"close must pay the operator exactly the charged {ch.charged} "
                                              f"nanoton and return {ch.deposit - ch.charged} to the caller",
                                              charged=ch.charged)

            ch = gate.ledger.set_status_checked(cid, "closing", idle)
            return JSONResponse({"signature_b": sign_close(operator_key, *args).hex(), "charged": ch.charged})
        except CocoonError as exc:
            return err(exc)

    async def ledger(request: Request) -> JSONResponse:
        try:
            require_operator(request)
        except CocoonError as exc:
            return err(exc)
        out: dict[str, Any] = {"balances": gate.ledger.balances(), "closes": gate.ledger.closes()}
        if request.query_params.get("verify"):
            out["verify"] = v = gate.ledger.verify()
            if watchtower is not None:  # the books against the chain's own record of each close's payout
                v["chain"] = chain = watchtower.check_payouts()
                v["problems"] += chain["problems"]
                v["ok"] = v["ok"] and not chain["problems"]
        return JSONResponse(out)

    async def ledger_call(request: Request) -> JSONResponse:
        try:
            require_operator(request)
            row = gate.ledger.call(request.path_params["call_id"])
            if row is None:
                raise NotFoundError(f"no paid call {request.path_params['call_id']!r} in the ledger")
            return JSONResponse(row)
        except CocoonError as exc:
            return err(exc)

    async def earnings(request: Request) -> JSONResponse:
        try:
            require_operator(request)
            return JSONResponse({"providers": provider_earnings(gate.ledger)})
        except CocoonError as exc:
            return err(exc)

    async def payout(request: Request) -> JSONResponse:
        try:
            require_operator(request)
            if operator_key is None or gate.chain is None:
                raise ConflictError("payouts need the operator's key and a settlement backend")
            pid = request.path_params["provider_id"]
            d = await body(request)
            try:
                key, wallet = PublicKey(bytes.fromhex(str(d["public_key"]))), Address.parse(str(d["wallet"]))
            except (KeyError, ValueError, TypeError):
                raise InvalidRequestError("send public_key (hex) and wallet of the provider, optionally amount and "
                                          "deposit (nanoton)") from None
            amount, deposit = _nanoton(d, "amount"), _nanoton(d, "deposit")
            reg = registered(pid)
            if reg is not None and (wallet.raw != Address.parse(reg[0]).raw or key.hex() != reg[1].lower()):
                # earnings go where the provider said when it joined, not where a typo (or a thief) says
                raise ConflictError(f"provider {pid!r} registered wallet {reg[0]} and key {reg[1]}; a payout to it "
                                    "goes there: pass those (`cocoon provider ls --json` shows them)",
                                    wallet=reg[0], public_key=reg[1])
            due = next((e["due"] for e in provider_earnings(gate.ledger) if e["provider_id"] == pid), 0)
            if due <= 0:
                raise ConflictError(f"provider {pid!r} is due nothing; see GET /v1/ledger/providers")
            # refused before a channel is funded for it (`pay` checks again under the channel's row lock)
            if amount is not None and amount > due:
                raise ConflictError(f"provider {pid!r} is due {due} nanoton; cannot pay {amount}", due=due)
            want = due if amount is None else amount
            have = [c for c in payout_channels_of(gate.ledger, [pid]) if c["status"] != "retired"]
            short = bool(have) and have[0]["status"] == "open" and have[0]["left"] < want
            if deposit is not None and deposit < want and (not have or short):
                raise InvalidRequestError(f"a deposit of {deposit} nanoton cannot cover the {want} to pay now (a "
                                          "payout channel cannot be topped up once open); send a larger deposit, "
                                          "or none for 10x what is due")
            # the channel's state is a row of the shared ledger: any gateway with the operator key can pay
            channels = PayoutChannels(gate.ledger, gate.chain, operator_key)
            # too little left in the open channel: retire it (the provider closes it with its last state) and pay
            # through a new one
            retired = await asyncio.to_thread(channels.retire_if_short, pid, want) if short else None
            await asyncio.to_thread(channels.ensure_open, pid, key, wallet,
                                    deposit if deposit is not None else max(10 * due, 10**9))
            out = await asyncio.to_thread(channels.pay, pid, amount)
            return JSONResponse({**out, "retired_channel_id": retired} if retired is not None else out)
        except CocoonError as exc:
            return err(exc)

    async def operator_close(request: Request) -> JSONResponse:
        try:
            require_operator(request)
            if watchtower is None:
                raise ConflictError("this gateway runs no watchtower (no settlement backend or operator key)")
            return JSONResponse(watchtower.start_operator_close(int(request.path_params["cid"])))
        except CocoonError as exc:
            return err(exc)

    return [Route("/v1/payments/operator", operator),
            Route("/v1/ledger/channels/{cid:int}/close", operator_close, methods=["POST"]), Route("/v1/channels", register, methods=["POST"]),
            Route("/v1/channels/{cid:int}", show), Route("/v1/channels/{cid:int}/close", close, methods=["POST"]),
            Route("/v1/ledger", ledger), Route("/v1/ledger/calls/{call_id}", ledger_call),
            Route("/v1/ledger/providers", earnings),
            Route("/v1/ledger/providers/{provider_id}/payout", payout, methods=["POST"])]
