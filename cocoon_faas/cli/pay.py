"""`cocoon wallet …`, `cocoon channel …`, `cocoon ledger`: thin commands over cocoon_faas.ton and the gateway's
payment routes (gateway/payments_routes.py). Wallet and channel state live under COCOON_HOME."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click
import httpx

from cocoon_faas.errors import CocoonError, InvalidRequestError, error_from_body
from cocoon_faas.settings import get_settings
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.amounts import format_ton, to_nano
from cocoon_faas.ton.chain import backend_from_settings, require_ok
from cocoon_faas.ton.channel import ChannelConfig
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey, PublicKey, new_mnemonic
from cocoon_faas.ton.messages import CooperativeClose, InitChannel, TopUp, sign_close
from cocoon_faas.ton.wallet import Wallet

GAS = 50_000_000  # 0.05 TON attached to each channel message


def _out(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _home() -> Path:
    return get_settings().home


def _load_wallet() -> tuple[PrivateKey, Wallet]:
    f = _home() / "wallet.json"
    if not f.exists():
        raise InvalidRequestError("no wallet yet; run `cocoon wallet create`")
    key = PrivateKey.from_mnemonic(json.loads(f.read_text())["words"])
    return key, Wallet(key.public_key())


def _chain() -> Any:
    return backend_from_settings(get_settings())


def _operator_headers() -> dict[str, str]:
    """The gateway operator's API key (COCOON_API_KEY or the key file `cocoon serve` wrote)."""
    from cocoon_faas.client import read_local_key

    s = get_settings()
    key = s.api_key or read_local_key(s.home)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _gateway(method: str, path: str, **kw: Any) -> Any:
    try:
        r = httpx.request(method, get_settings().gateway_url + path, timeout=30, **kw)
    except httpx.HTTPError as exc:
        raise InvalidRequestError(f"cannot reach the gateway at {get_settings().gateway_url} ({exc}); "
                                  "start it with `cocoon serve` or set COCOON_GATEWAY_URL") from None
    if r.status_code >= 400:
        raise error_from_body(r.status_code, r.json() if r.content else {})
    return r.json()


def _current() -> dict[str, Any]:
    f = _home() / "channel.json"
    if not f.exists():
        raise InvalidRequestError("no open channel; run `cocoon channel open --deposit 5`")
    return dict(json.loads(f.read_text()))


def _cfg(c: dict[str, Any]) -> ChannelConfig:
    return ChannelConfig(c["channel_id"], PublicKey(bytes.fromhex(c["key_a"])), PublicKey(bytes.fromhex(c["key_b"])),
                         Address.parse(c["dest_a"]), Address.parse(c["dest_b"]))


def register(main: click.Group) -> None:
    @main.group()
    def wallet() -> None:
        """Your TON wallet (keys under COCOON_HOME)."""

    @wallet.command("create")
    @click.option("--force", is_flag=True, help="replace an existing wallet (its words are lost)")
    def wallet_create(force: bool) -> None:
        f = _home() / "wallet.json"
        if f.exists() and not force:
            _fail(InvalidRequestError(f"a wallet exists at {f}; pass --force to replace it"))
        words = new_mnemonic()
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"words": words}))
        os.chmod(f, 0o600)
        key = PrivateKey.from_mnemonic(words)
        _out({"address": Wallet(key.public_key()).address.friendly(), "public_key": key.public_key().hex(),
              "mnemonic": " ".join(words)})

    @wallet.command("show")
    def wallet_show() -> None:
        try:
            key, w = _load_wallet()
            bal = _chain().balance(w.address)
            _out({"address": w.address.friendly(), "raw": w.address.raw, "balance_ton": format_ton(bal)})
        except CocoonError as exc:
            _fail(exc)

    @wallet.command("faucet")
    @click.argument("amount")
    def wallet_faucet(amount: str) -> None:
        """Fund the wallet on the local development chain."""
        try:
            _, w = _load_wallet()
            chain = _chain()
            if not hasattr(chain, "faucet"):
                raise InvalidRequestError("the faucet exists only on the local chain (COCOON_SETTLEMENT=local); "
                                          "fund a testnet wallet from a testnet faucet")
            bal = chain.faucet(w.address, to_nano(amount))
            _out({"address": w.address.friendly(), "balance_ton": format_ton(bal)})
        except CocoonError as exc:
            _fail(exc)

    @main.group()
    def channel() -> None:
        """Your payment channel to the gateway operator."""

    @channel.command("open")
    @click.option("--deposit", required=True, help="TON to lock in the channel, e.g. 5")
    def channel_open(deposit: str) -> None:
        try:
            key, w = _load_wallet()
            dep = to_nano(deposit)
            op = _gateway("GET", "/v1/payments/operator")
            op_key = PublicKey(bytes.fromhex(op["public_key"]))
            cid = secrets.randbits(63)
            cfg = ChannelConfig(cid, key.public_key(), op_key, w.address, Address.parse(op["address"]))
            chain = _chain()
            require_ok(chain.send_to_channel(key, w, cfg, TopUp(dep).to_cell(), dep + GAS), "top-up")
            require_ok(chain.send_to_channel(key, w, cfg, InitChannel.signed(key, True, cid, dep, 0).to_cell(), GAS),
                       "init")
            _gateway("POST", "/v1/channels", json={"channel_id": cid, "key_a": key.public_key().hex(),
                                                   "dest_a": w.address.raw, "address": cfg.address.raw,
                                                   "deposit": dep})
            ChannelSigner(_home() / "channels" / f"{cid}.json", key, cid, dep)
            state = {"channel_id": cid, "key_a": key.public_key().hex(), "key_b": op_key.hex(),
                     "dest_a": w.address.raw, "dest_b": cfg.dest_b.raw, "address": cfg.address.friendly()}
            (_home() / "channel.json").write_text(json.dumps(state))
            _out({**state, "deposit_ton": format_ton(dep)})
        except CocoonError as exc:
            _fail(exc)

    @channel.command("show")
    def channel_show() -> None:
        try:
            c = _current()
            key, _ = _load_wallet()
            s = ChannelSigner(_home() / "channels" / f"{c['channel_id']}.json", key)
            _out({"channel_id": c["channel_id"], "address": c["address"], "deposit_ton": format_ton(s.deposit),
                  "charged_ton": format_ton(s.charged), "seqno": s.seqno,
                  "gateway": _gateway("GET", f"/v1/channels/{c['channel_id']}")})
        except CocoonError as exc:
            _fail(exc)

    @channel.command("close")
    def channel_close() -> None:
        """Cooperative close: you get back the deposit minus what was charged."""
        try:
            c = _current()
            key, w = _load_wallet()
            cid = c["channel_id"]
            s = ChannelSigner(_home() / "channels" / f"{cid}.json", key)
            # The gateway's count wins when it differs from ours (a response lost in a crash was still charged),
            # but never above what we signed: that is all the operator could claim on chain anyway.
            charged = int(_gateway("GET", f"/v1/channels/{cid}")["charged"])
            if charged > s.sent:
                raise InvalidRequestError(f"the gateway claims {charged} nanoton, more than the {s.sent} you signed "
                                          "for; do not close cooperatively (dispute with your latest state)")
            args = (cid, s.deposit - charged, charged, max(s.seqno, 1), 1)
            sig_a = sign_close(key, *args)
            sig_b = bytes.fromhex(_gateway("POST", f"/v1/channels/{cid}/close", json={
                "balance_a": args[1], "balance_b": args[2], "seqno_a": args[3], "seqno_b": args[4],
                "signature_a": sig_a.hex()})["signature_b"])
            msg = CooperativeClose(sig_a, sig_b, *args)
            res = require_ok(_chain().send_to_channel(key, w, _cfg(c), msg.to_cell(), GAS), "close")
            (_home() / "channel.json").unlink()
            _out({"closed": cid, "refund_ton": format_ton(args[1]), "paid_ton": format_ton(args[2]),
                  "charged_locally_ton": format_ton(s.charged),
                  "payouts": [{"to": p.dest.friendly(), "nanoton": p.amount, "mode": p.mode} for p in res.payouts]})
        except CocoonError as exc:
            _fail(exc)

    existing = main.commands.get("provider")
    if isinstance(existing, click.Group):  # cli/provider.py may define the group; add to it when it does
        provider: click.Group = existing
    else:

        @main.group("provider")
        def _provider() -> None:
            """Providers: what they earned and payouts to them (operator)."""

        provider = _provider

    @provider.command("earnings")
    def provider_earnings_cmd() -> None:
        """Per provider: earned, paid out and due, from the gateway's ledger (operator key)."""
        try:
            _out(_gateway("GET", "/v1/ledger/providers", headers=_operator_headers())["providers"])
        except CocoonError as exc:
            _fail(exc)

    @provider.command("payout")
    @click.argument("provider_id")
    @click.option("--key", "public_key", required=True, help="the provider's Ed25519 public key (hex)")
    @click.option("--wallet", required=True, help="the provider's wallet address (payouts land there on close)")
    @click.option("--amount", default=None, help="TON to pay (default: all that is due)")
    @click.option("--deposit", default=None, help="TON to lock in a new payout channel (default: 10x due, >= 1)")
    def provider_payout_cmd(provider_id: str, public_key: str, wallet: str, amount: str | None,
                            deposit: str | None) -> None:
        """Pay a provider what it is due through the operator's channel to it (opened on first payout)."""
        try:
            body: dict[str, Any] = {"public_key": public_key, "wallet": wallet}
            if amount is not None:
                body["amount"] = to_nano(amount)
            if deposit is not None:
                body["deposit"] = to_nano(deposit)
            _out(_gateway("POST", f"/v1/ledger/providers/{provider_id}/payout", json=body,
                          headers=_operator_headers()))
        except CocoonError as exc:
            _fail(exc)

    @main.command("ledger")
    @click.option("--verify", is_flag=True, help="check conservation and state coverage")
    def ledger_cmd(verify: bool) -> None:
        """Balances per party (caller, providers, developers, operator)."""
        try:
            out = _gateway("GET", "/v1/ledger" + ("?verify=1" if verify else ""), headers=_operator_headers())
            _out(out)
            if verify and not out["verify"]["ok"]:
                sys.exit(1)
        except CocoonError as exc:
            _fail(exc)
