"""`cocoon wallet …`, `cocoon channel …`, `cocoon ledger`: thin commands over cocoon_faas.ton and the gateway's
payment routes (gateway/payments_routes.py). Wallet and channel state live under COCOON_HOME."""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx

from cocoon_faas.errors import (
    CocoonError,
    ConflictError,
    InvalidRequestError,
    PaymentRequiredError,
    error_from_body,
)
from cocoon_faas.settings import get_settings
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.amounts import format_ton, to_nano
from cocoon_faas.ton.chain import MESSAGE_FEE, backend_from_settings, local_chain_path, require_ok
from cocoon_faas.ton.channel import ChannelConfig, SignedSemiChannel
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.closing import (
    ClosingTerms,
    check_closing,
    check_exit_state,
    closing_from_dict,
    closing_to_dict,
    phase_of,
    spendable,
)
from cocoon_faas.ton.home_files import load_wallet_key, read_channel
from cocoon_faas.ton.keys import PrivateKey, PublicKey, new_mnemonic
from cocoon_faas.ton.messages import (
    CooperativeClose,
    FinishUncooperativeClose,
    InitChannel,
    StartUncooperativeClose,
    TopUp,
    sign_close,
)
from cocoon_faas.ton.wallet import Wallet

GAS = 50_000_000  # 0.05 TON attached to each channel message
T = TypeVar("T")


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
    key = load_wallet_key(f)
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
    from cocoon_faas.transport import gateway_urls

    urls = gateway_urls(get_settings().gateway_url)
    for i, url in enumerate(urls):  # several gateways: the next one when this one was never reached (or a GET)
        try:
            r = httpx.request(method, url + path, timeout=30, **kw)
            break
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if i + 1 < len(urls) and (method == "GET" or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))):
                continue
            raise InvalidRequestError(f"cannot reach the gateway at {url} ({exc}); "
                                      "start it with `cocoon serve` or set COCOON_GATEWAY_URL") from None
    try:
        body = r.json() if r.content else {}
    except ValueError:  # not a Cocoon gateway (a wrong port or path): its page is no error of ours
        body = r.text
    if r.status_code >= 400 or not isinstance(body, dict):  # every gateway route answers a JSON object
        raise error_from_body(r.status_code, body)
    return body


def _answer(body: dict[str, Any], key: str, parse: Callable[[str], T]) -> T:
    """One field of the gateway's answer; a missing or malformed one is an error that moves nothing."""
    try:
        return parse(str(body[key]))
    except (KeyError, ValueError, TypeError):
        raise InvalidRequestError(f"the gateway's answer has no valid {key!r}; nothing was closed: check "
                                  "COCOON_GATEWAY_URL, or close without the operator (`cocoon channel close "
                                  "--force`)") from None


def _current() -> dict[str, Any]:
    c = read_channel(_home() / "channel.json")
    if c is None:
        raise InvalidRequestError("no open channel; run `cocoon channel open --deposit 5`")
    return c


def _cfg(c: dict[str, Any]) -> ChannelConfig:
    return ChannelConfig(c["channel_id"], PublicKey(bytes.fromhex(c["key_a"])), PublicKey(bytes.fromhex(c["key_b"])),
                         Address.parse(c["dest_a"]), Address.parse(c["dest_b"]), closing_from_dict(c.get("closing")))


def register(main: click.Group) -> None:
    @main.group()
    def wallet() -> None:
        """Your TON wallet (keys under COCOON_HOME)."""

    @wallet.command("create")
    @click.option("--force", is_flag=True, help="replace an existing wallet (refused while a channel is open; the "
                  "old wallet file is kept beside as wallet-replaced-<time>.json)")
    def wallet_create(force: bool) -> None:
        f = _home() / "wallet.json"
        kept = None
        if f.exists():
            if not force:
                _fail(InvalidRequestError(f"a wallet exists at {f}; pass --force to replace it"))
            try:
                current = read_channel(_home() / "channel.json", need=("channel_id",))
            except CocoonError:
                current = {"channel_id": "(damaged record)"}
            if current is not None:  # its deposit comes back only with this wallet's key
                _fail(ConflictError(f"channel {current['channel_id']} is open with this wallet's key; close it "
                                    "first (`cocoon channel close`), then replace the wallet"))
            # the old key may still hold TON: kept beside, never deleted
            kept = f.with_name(f"wallet-replaced-{int(time.time())}.json")
            os.replace(f, kept)
        words = new_mnemonic()
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"words": words}))
        os.chmod(f, 0o600)
        key = PrivateKey.from_mnemonic(words)
        _out({"address": Wallet(key.public_key()).address.friendly(), "public_key": key.public_key().hex(),
              "mnemonic": " ".join(words), **({"previous_wallet_kept_at": str(kept)} if kept else {})})

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
        """Fund a channel to the gateway operator, after checking its closing terms and taking the operator's
        exit state (what lets you close it alone later)."""
        try:
            key, w = _load_wallet()
            dep = to_nano(deposit)
            if dep == 0:
                raise InvalidRequestError("a deposit of 0 TON pays for no call; write --deposit 5")
            chain = _chain()
            current = read_channel(_home() / "channel.json")
            if current is not None:  # one record per home: a second channel would hide the first's deposit
                data = chain.channel_data(_cfg(current))
                if data is None or data.inited or data.balance_a or data.balance_b:
                    raise ConflictError(f"channel {current['channel_id']} is still open from this COCOON_HOME (or "
                                        "not on this chain); close it first (`cocoon channel close`, or `--force` "
                                        "then `cocoon channel finish`)")
            need = dep + 2 * (GAS + MESSAGE_FEE)
            if (have := chain.balance(w.address)) < need:  # checked up front: a top-up without its init strands it
                raise PaymentRequiredError(f"wallet {w.address.friendly()} holds {format_ton(have)} TON; a deposit "
                                           f"of {format_ton(dep)} TON needs {format_ton(need)} (with two messages' "
                                           "gas); fund the wallet (`cocoon wallet faucet 10` on the local chain)",
                                           needed=need - have)
            cid = secrets.randbits(63)
            op = _gateway("GET", f"/v1/payments/operator?channel_id={cid}")
            try:  # the operator's terms come from another party: malformed ones end here, before any money moves
                op_key = PublicKey(bytes.fromhex(op["public_key"]))
                closing = ClosingTerms.from_dict(op.get("closing") or {}).config_for(dep)
                exit_state = SignedSemiChannel.from_boc(base64.b64decode(str(op.get("exit_state", ""))))
                op_address = Address.parse(op["address"])
            except CocoonError:
                raise
            except Exception as exc:
                raise InvalidRequestError(f"the gateway's operator terms are malformed ({type(exc).__name__}: "
                                          f"{exc}); nothing was paid: check COCOON_GATEWAY_URL") from None
            check_closing(closing, dep, get_settings().channel_max_close_s)  # before any money moves
            check_exit_state(exit_state, op_key, cid)
            cfg = ChannelConfig(cid, key.public_key(), op_key, w.address, op_address, closing)
            if current is not None:  # closed on chain without this CLI (the operator's close, a crash after ours)
                os.replace(_home() / "channel.json", _home() / f"channel-{current['channel_id']}-closed.json")
            require_ok(chain.send_to_channel(key, w, cfg, TopUp(dep).to_cell(), dep + GAS), "top-up")
            require_ok(chain.send_to_channel(key, w, cfg, InitChannel.signed(key, True, cid, dep, 0).to_cell(), GAS),
                       "init")
            # saved before registering: a gateway that refuses it now cannot lock the deposit in
            ChannelSigner(_home() / "channels" / f"{cid}.json", key, cid, dep, limit=spendable(dep, closing))
            state = {"channel_id": cid, "key_a": key.public_key().hex(), "key_b": op_key.hex(),
                     "dest_a": w.address.raw, "dest_b": cfg.dest_b.raw, "address": cfg.address.friendly(),
                     "deposit": dep, "closing": closing_to_dict(closing),
                     "exit_state": base64.b64encode(exit_state.to_boc()).decode()}
            (_home() / "channel.json").write_text(json.dumps(state))
            try:
                _gateway("POST", "/v1/channels", json={"channel_id": cid, "key_a": key.public_key().hex(),
                                                       "dest_a": w.address.raw, "address": cfg.address.raw,
                                                       "deposit": dep, "closing": closing_to_dict(closing)})
            except CocoonError as exc:
                hint = ""
                s = get_settings()
                if exc.details.get("problem") == "not_on_chain" and s.settlement == "local":
                    # the top-up and init just succeeded here: the gateway reads another local chain file
                    hint = (f"; this CLI funded it on the local chain {local_chain_path(s.home, s.chain_path)}, "
                            "which the gateway does not read: point COCOON_CHAIN_PATH at the gateway's (its "
                            "COCOON_HOME/chain.db)")
                raise type(exc)(f"{exc.message} (the channel is funded; leave with `cocoon channel close --force`"
                                f"{hint})") from None
            _out({**{k: v for k, v in state.items() if k != "exit_state"}, "deposit_ton": format_ton(dep),
                  "spendable_ton": format_ton(spendable(dep, closing))})
        except CocoonError as exc:
            _fail(exc)

    @channel.command("show")
    def channel_show() -> None:
        """The channel's phase on chain, what you were charged, and when the next step becomes possible."""
        try:
            c = _current()
            key, _ = _load_wallet()
            s = ChannelSigner(_home() / "channels" / f"{c['channel_id']}.json", key)
            chain = _chain()
            now = int(chain.now())
            ph = phase_of(chain.channel_data(_cfg(c)), now)
            out: dict[str, Any] = {
                "channel_id": c["channel_id"], "address": c["address"], "deposit_ton": format_ton(s.deposit),
                "charged_ton": format_ton(s.charged), "seqno": s.seqno, "phase": ph.name,
                "next_step": ph.describe(now), "closing": c.get("closing")}
            if ph.finish_after is not None:
                out.update(started_by=ph.started_by, challenged=ph.challenged, challenge_until=ph.challenge_until,
                           finish_possible_at=ph.finish_after + 1, finish_in_s=max(0, ph.finish_after + 1 - now))
            try:
                out["gateway"] = _gateway("GET", f"/v1/channels/{c['channel_id']}")
            except CocoonError as exc:  # the chain is the authority; the gateway may be gone
                out["gateway"] = {"error": exc.message}
            _out(out)
        except CocoonError as exc:
            _fail(exc)

    @channel.command("close")
    @click.option("--force", is_flag=True, help="close without the operator: start an uncooperative close on chain "
                  "(finish it with `cocoon channel finish` after the quarantine)")
    def channel_close(force: bool) -> None:
        """Cooperative close: you get back the deposit minus what was charged. --force: the same, without the
        operator, after the channel's quarantine."""
        try:
            if force:
                _force_close()
                return
            c = _current()
            key, w = _load_wallet()
            cid = c["channel_id"]
            s = ChannelSigner(_home() / "channels" / f"{cid}.json", key)
            # The gateway's count wins when it differs from ours (a response lost in a crash was still charged),
            # but never above what we signed: that is all the operator could claim on chain anyway.
            charged = _answer(_gateway("GET", f"/v1/channels/{cid}"), "charged", int)
            if charged > s.sent:
                raise InvalidRequestError(f"the gateway claims {charged} nanoton, more than the {s.sent} you signed "
                                          "for; do not close cooperatively: `cocoon channel close --force` pays "
                                          "only what you were charged")
            args = (cid, s.deposit - charged, charged, max(s.seqno, 1), 1)
            sig_a = sign_close(key, *args)
            sig_b = _answer(_gateway("POST", f"/v1/channels/{cid}/close", json={
                "balance_a": args[1], "balance_b": args[2], "seqno_a": args[3], "seqno_b": args[4],
                "signature_a": sig_a.hex()}), "signature_b", bytes.fromhex)
            msg = CooperativeClose(sig_a, sig_b, *args)
            res = require_ok(_chain().send_to_channel(key, w, _cfg(c), msg.to_cell(), GAS), "close")
            (_home() / "channel.json").unlink()
            _out({"closed": cid, "refund_ton": format_ton(args[1]), "paid_ton": format_ton(args[2]),
                  "charged_locally_ton": format_ton(s.charged),
                  "payouts": [{"to": p.dest.friendly(), "nanoton": p.amount, "mode": p.mode} for p in res.payouts]})
        except CocoonError as exc:
            _fail(exc)

    def _force_close() -> None:
        c = _current()
        if not c.get("exit_state"):
            raise InvalidRequestError("this channel was opened without the operator's exit state (an older "
                                      "version): close it cooperatively with `cocoon channel close`")
        key, w = _load_wallet()
        cid = c["channel_id"]
        s = ChannelSigner(_home() / "channels" / f"{cid}.json", key)
        owed, source = s.charged, "local"
        try:  # the gateway's count, when it answers, covers a charge whose response we lost
            theirs = int(_gateway("GET", f"/v1/channels/{cid}")["charged"])
            if s.charged < theirs <= s.sent:
                owed, source = theirs, "gateway"
        except (CocoonError, KeyError, ValueError):
            pass
        mine = s.close_state(owed)
        op_state = SignedSemiChannel.from_boc(base64.b64decode(c["exit_state"]))
        chain = _chain()
        cfg = _cfg(c)
        res = chain.send_to_channel(key, w, cfg, StartUncooperativeClose.signed(key, True, cid, mine, op_state)
                                    .to_cell(), GAS)
        if res.exit_code == 106:
            raise ConflictError(f"a close of channel {cid} is already under way; `cocoon channel show` says when "
                                "`cocoon channel finish` becomes possible", exit_code=106)
        require_ok(res, "forced close")
        now = int(chain.now())
        ph = phase_of(chain.channel_data(cfg), now)
        _out({"channel_id": cid, "phase": ph.name, "pays_operator_ton": format_ton(owed), "counted_by": source,
              "refund_ton": format_ton(s.deposit - owed), "finish_possible_at": (ph.finish_after or now) + 1,
              "next_step": ph.describe(now)})

    @channel.command("resync")
    def channel_resync() -> None:
        """Catch this machine's signing state up with the gateway's newest state of the channel (after restoring
        the home from a backup, or using the channel from another machine): only a state your key signed counts."""
        try:
            c = _current()
            key, _ = _load_wallet()
            cid = c["channel_id"]
            summary = _gateway("GET", f"/v1/channels/{cid}")
            raw = summary.get("latest_state")
            s = ChannelSigner(_home() / "channels" / f"{cid}.json", key)
            if not raw:
                _out({"channel_id": cid, "resynced": False, "seqno": s.seqno, "sent": s.sent,
                      "note": "the gateway holds no state of this channel yet: nothing to catch up"})
                return
            try:
                newest = SignedSemiChannel.from_boc(base64.b64decode(str(raw), validate=True))
                charged = int(summary["charged"])
            except CocoonError:
                raise
            except Exception as exc:
                raise InvalidRequestError(f"the gateway's channel summary is malformed ({type(exc).__name__}: "
                                          f"{exc}); nothing was changed: check COCOON_GATEWAY_URL") from None
            _out({"channel_id": cid, "resynced": True, **s.resync(newest, charged)})
        except CocoonError as exc:
            _fail(exc)

    @channel.command("finish")
    def channel_finish() -> None:
        """Complete a forced close once its quarantine is over: the contract pays both sides."""
        try:
            c = _current()
            key, w = _load_wallet()
            chain = _chain()
            cfg = _cfg(c)
            now = int(chain.now())
            ph = phase_of(chain.channel_data(cfg), now)
            res = chain.send_to_channel(key, w, cfg, FinishUncooperativeClose().to_cell(), GAS)
            if res.exit_code == 113:
                raise ConflictError(f"too early: the quarantine of channel {c['channel_id']} ends at "
                                    f"{(ph.finish_after or now) + 1} (in {(ph.finish_after or now) + 1 - now} s); "
                                    "run `cocoon channel finish` then", exit_code=113)
            if res.exit_code == 107:
                raise ConflictError(f"no close of channel {c['channel_id']} is under way; start one with `cocoon "
                                    "channel close --force`", exit_code=107)
            require_ok(res, "finish")
            (_home() / "channel.json").unlink()
            _out({"closed": c["channel_id"], "payouts": [{"to": p.dest.friendly(), "nanoton": p.amount}
                                                         for p in res.payouts]})
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
    @click.option("--deposit", default=None, help="TON to lock in a new payout channel, opened on the first payout "
                  "and when the open one has too little left (default: 10x due, >= 1)")
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
