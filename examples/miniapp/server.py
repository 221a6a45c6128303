"""The Mini App's small backend: serves the page and the SDK bundle, validates Telegram's initData, funds and deploys
a payment channel for each Telegram user with a key the user's page made, and relays the page's calls to the gateway
as opaque bytes.

Run:  MINIAPP_BOT_TOKEN=123:abc COCOON_GATEWAY_URL=http://127.0.0.1:8000 python examples/miniapp/server.py --port 8080
and set the bot's Mini App URL (BotFather) to this server (HTTPS in production).

    GET  /                     the page (static/index.html, static/app.js); the SDK at /sdk/cocoon-sdk.js
    POST /api/session          {"init_data"} -> the Telegram user, the function, the attestation policy, and the
                               user's channel, or an offer {channel_id, deposit} whose init message the page signs
    POST /api/channel          {"init_data", "public_key", "signature"} -> the channel, funded and deployed with the
                               page's key as party A (this server's wallet pays the deposit) and registered
    *    /gw/...               a relay to the gateway for exactly: POST /fn/{name}, GET /v1/functions/{name}[/attestation],
                               GET|DELETE /v1/calls/{id}. It forwards bytes: sealed calls stay sealed (it never has a key)

What this server can and cannot do: it sees sealed envelopes, sizes and timing, never a prompt or an answer (the
browser seals to the attested replica and opens the answer itself). It could lie about the attestation documents it
relays — the browser then refuses to send (try MINIAPP_TAMPER_ATTESTATION=1). It never holds the key that signs the
user's payment states: the page makes it (kept in the browser's localStorage) and signs the channel's init message;
this server only pays the deposit, so what it funded is spent only by the user's own signatures.
Settings (environment): MINIAPP_BOT_TOKEN (required), COCOON_GATEWAY_URL, COCOON_CHAIN_PATH / COCOON_SETTLEMENT (the
settlement chain, as for the CLI; the faucet tops up the funding wallet on the local development chain only),
MINIAPP_FUNCTION (Chat.generate), MINIAPP_DATA (the funding wallet and users' channels; ./miniapp-data),
MINIAPP_DEPOSIT_TON (1), MINIAPP_TRUSTED_DEV_KEY (hex: trust this
NOT SECURE development attestation key; unset: TDX only), MINIAPP_MAX_AGE_S (3600), MINIAPP_CAPTURE (append every
relayed body here: audits and the test that no plaintext reaches this server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))
from initdata import InitDataError, validate_init_data  # noqa: E402  (this folder is not a package)

from cocoon_faas.settings import get_settings  # noqa: E402
from cocoon_faas.ton.address import Address  # noqa: E402
from cocoon_faas.ton.chain import backend_from_settings, require_ok  # noqa: E402
from cocoon_faas.ton.channel import ChannelConfig, SignedSemiChannel  # noqa: E402
from cocoon_faas.ton.closing import (  # noqa: E402
    ClosingTerms,
    check_closing,
    check_exit_state,
    closing_to_dict,
    spendable,
)
from cocoon_faas.ton.keys import PrivateKey, PublicKey  # noqa: E402
from cocoon_faas.ton.messages import InitChannel, TopUp  # noqa: E402
from cocoon_faas.ton.wallet import Wallet  # noqa: E402

HERE = Path(__file__).resolve().parent
SDK_BUNDLE = HERE.parents[1] / "sdk-js" / "dist" / "cocoon-sdk.js"
RELAYED = re.compile(r"^(fn/[\w.\-]+|v1/functions/[\w.\-]+(/attestation)?|v1/calls/[\w\-]+)$")
REQUEST_HEADERS = ("content-type", "accept", "prefer", "x-cocoon-payment")
RESPONSE_HEADERS = ("content-type", "x-cocoon-charge", "x-cocoon-call-id", "x-cocoon-sealed-kind", "x-cocoon-exec-ms",
                    "retry-after")


class Config:
    def __init__(self) -> None:
        self.bot_token = os.environ.get("MINIAPP_BOT_TOKEN", "")
        if not self.bot_token:
            raise SystemExit("set MINIAPP_BOT_TOKEN to the bot's token (BotFather): initData is checked with it")
        self.gateway = os.environ.get("COCOON_GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")
        self.function = os.environ.get("MINIAPP_FUNCTION", "Chat.generate")
        self.data = Path(os.environ.get("MINIAPP_DATA", "miniapp-data"))
        self.deposit = os.environ.get("MINIAPP_DEPOSIT_TON", "1")
        self.dev_key = os.environ.get("MINIAPP_TRUSTED_DEV_KEY", "")
        self.max_age = float(os.environ.get("MINIAPP_MAX_AGE_S", "3600"))
        self.tamper = os.environ.get("MINIAPP_TAMPER_ATTESTATION") == "1"
        self.capture = os.environ.get("MINIAPP_CAPTURE", "")


GAS = 50_000_000  # nanoton attached to each channel message (as `cocoon channel open` does)


class Channels:
    """Each Telegram user's channel: the page makes the key and signs the channel's init message; this server only
    funds and deploys the channel (from its own wallet on the settlement chain) and registers it with the gateway.
    It never holds the key that signs payment states."""

    def __init__(self, cfg: Config) -> None:

        self.cfg = cfg
        self.chain = backend_from_settings(get_settings())
        keyfile = cfg.data / "funding_wallet.key"
        if not keyfile.exists():
            keyfile.parent.mkdir(parents=True, exist_ok=True)
            keyfile.write_bytes(PrivateKey.generate().to_bytes())
            keyfile.chmod(0o600)
        self.key = PrivateKey(keyfile.read_bytes())
        self.wallet = Wallet(self.key.public_key())
        self.deposit = int(round(float(cfg.deposit) * 1e9))

    def _path(self, user_id: int) -> Path:
        return self.cfg.data / "users" / f"{user_id}.json"

    def get(self, user_id: int) -> dict[str, Any]:
        """The user's channel record, or an offer (a fresh channel id and the deposit) for the page to sign."""
        path = self._path(user_id)
        if path.exists():
            return {"channel": json.loads(path.read_text())}
        offer = path.with_suffix(".offer")
        if not offer.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            offer.write_text(json.dumps({"channel_id": str(secrets.randbits(63)), "deposit": str(self.deposit)}))
        return {"offer": json.loads(offer.read_text())}

    def open(self, user_id: int, public_key: str, signature: str) -> dict[str, Any]:

        got = self.get(user_id)
        if "channel" in got:
            return dict(got["channel"])
        cid, dep = int(got["offer"]["channel_id"]), int(got["offer"]["deposit"])
        key_a, sig = PublicKey(bytes.fromhex(public_key)), bytes.fromhex(signature)
        if not key_a.is_valid(sig, InitChannel.payload(cid, dep, 0).hash):
            raise ValueError("the init signature does not verify with that key for this channel id and deposit")
        # the operator's closing terms and its signed exit state, checked as `cocoon channel open` does
        op = httpx.get(f"{self.cfg.gateway}/v1/payments/operator", params={"channel_id": cid}, timeout=30).json()
        op_key = PublicKey(bytes.fromhex(op["public_key"]))
        closing = ClosingTerms.from_dict(op.get("closing") or {}).config_for(dep)
        check_closing(closing, dep, get_settings().channel_max_close_s)
        exit_state = SignedSemiChannel.from_boc(base64.b64decode(str(op.get("exit_state", ""))))
        check_exit_state(exit_state, op_key, cid)
        dest_a = Wallet(key_a).address  # the user's own wallet address: a close pays the rest out to it
        cfg = ChannelConfig(cid, key_a, op_key, dest_a, Address.parse(op["address"]), closing)
        if hasattr(self.chain, "faucet") and self.chain.balance(self.wallet.address) < dep + 4 * GAS:
            self.chain.faucet(self.wallet.address, dep + 10 * GAS)  # the local development chain only
        require_ok(self.chain.send_to_channel(self.key, self.wallet, cfg, TopUp(dep).to_cell(), dep + GAS), "top-up")
        require_ok(self.chain.send_to_channel(self.key, self.wallet, cfg, InitChannel(True, sig, cid, dep, 0).to_cell(),
                                              GAS), "init")
        r = httpx.post(f"{self.cfg.gateway}/v1/channels", timeout=30, json={
            "channel_id": cid, "key_a": public_key, "dest_a": dest_a.raw, "address": cfg.address.raw, "deposit": dep,
            "closing": closing_to_dict(closing)})
        if r.status_code >= 400:
            raise RuntimeError(f"the gateway refused the channel: {r.text}")
        # `spendable`: the most a state may send (the fine must still fit the deposit); the exit state is the
        # operator's signature that lets the user close alone later: the page keeps both
        rec = {"channel_id": str(cid), "key_a": public_key, "deposit": str(dep), "spendable": str(spendable(dep, closing)),
               "address": cfg.address.friendly(), "closing": closing_to_dict(closing),
               "exit_state": base64.b64encode(exit_state.to_boc()).decode()}
        self._path(user_id).write_text(json.dumps(rec))
        return rec


def create_app(cfg: Config) -> Starlette:
    client = httpx.AsyncClient(timeout=httpx.Timeout(330.0, connect=10.0))
    locks: dict[int, asyncio.Lock] = {}

    def capture(kind: str, body: bytes) -> None:
        if cfg.capture:
            with open(cfg.capture, "ab") as f:
                f.write(kind.encode() + b" " + body + b"\n")

    async def page(request: Request) -> Response:
        return FileResponse(HERE / "static" / "index.html", headers={"Cache-Control": "no-store"})

    async def static(request: Request) -> Response:
        name = request.path_params["file"]
        if name == "cocoon-sdk.js":
            if not SDK_BUNDLE.exists():
                return JSONResponse({"error": "build the SDK first: cd sdk-js && npm ci && npm run build"}, 503)
            return FileResponse(SDK_BUNDLE, media_type="text/javascript")
        if name not in ("app.js", "app.css"):
            return JSONResponse({"error": f"no file {name!r}"}, 404)
        return FileResponse(HERE / "static" / name)

    channels = Channels(cfg)

    async def user_of(request: Request) -> tuple[Any, dict[str, Any]]:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("body")
        return validate_init_data(str(body.get("init_data", "")), cfg.bot_token, max_age_s=cfg.max_age), body

    def refused(exc: Exception) -> Response:
        if isinstance(exc, InitDataError):
            return JSONResponse({"error": {"type": "init_data", "reason": exc.reason, "message": str(exc)}}, 401)
        return JSONResponse({"error": {"type": "invalid_request", "message": f"{exc}; send JSON with init_data"}}, 400)

    async def session(request: Request) -> Response:
        """The user, the function, the policy, and the user's channel (or an offer to sign, to open one)."""
        try:
            user, _ = await user_of(request)
        except ValueError as exc:
            return refused(exc)
        async with locks.setdefault(user.id, asyncio.Lock()):
            got = await asyncio.to_thread(channels.get, user.id)
        fn = (await client.get(f"{cfg.gateway}/v1/functions/{cfg.function}")).json()
        if "channel" in got:
            summary = (await client.get(f"{cfg.gateway}/v1/channels/{got['channel']['channel_id']}")).json()
            got["channel"].update({k: str(summary.get(k, 0)) for k in ("seqno", "sent", "charged")})
        return JSONResponse({
            "user": {"id": user.id, "first_name": user.first_name, "username": user.username},
            "function": cfg.function,
            # The policy the browser verifies documents against: the measurement the gateway publishes for the
            # function (a production page would pin it in its own static code) and, for development, a dev key.
            "policy": {"measurements": [fn.get("measurement")], "trustedDevKeys": [cfg.dev_key] if cfg.dev_key else []},
            **got,
        })

    async def open_channel(request: Request) -> Response:
        """{init_data, public_key, signature}: fund and deploy the offered channel with the page's key."""
        try:
            user, body = await user_of(request)
            async with locks.setdefault(user.id, asyncio.Lock()):
                rec = await asyncio.to_thread(channels.open, user.id, str(body["public_key"]), str(body["signature"]))
        except (ValueError, KeyError) as exc:
            return refused(exc if isinstance(exc, ValueError) else ValueError(f"missing {exc}"))
        return JSONResponse({"channel": {**rec, "seqno": "0", "sent": "0", "charged": "0"}})

    async def relay(request: Request) -> Response:
        path = request.path_params["path"]
        if not RELAYED.match(path) or (request.method == "POST") != path.startswith("fn/"):
            return JSONResponse({"error": {"type": "not_found", "message": f"this relay does not serve {path}"}}, 404)
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
        body = await request.body()
        if body:
            capture("request", body)
        req = client.build_request(request.method, f"{cfg.gateway}/{path}", headers=headers, content=body,
                                   params=request.query_params)
        r = await client.send(req, stream=True)
        out = {k: v for k, v in r.headers.items() if k.lower() in RESPONSE_HEADERS}
        if cfg.tamper and path.endswith("/attestation") and r.status_code == 200:
            doc = json.loads(await r.aread())
            await r.aclose()
            for d in doc.get("documents", []):  # a malicious relay slips in keys of its own
                d["hpke_public_key"] = "11" * 32
                from cocoon_faas.confidential.document import key_id

                d["key_id"] = key_id(bytes.fromhex(d["hpke_public_key"]))
            return JSONResponse(doc, r.status_code)

        async def chunks() -> Any:
            async for c in r.aiter_raw():
                capture("response", c)
                yield c

        return StreamingResponse(chunks(), status_code=r.status_code, headers=out, background=BackgroundTask(r.aclose))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(routes=[
        Route("/", page), Route("/static/{file}", static), Route("/sdk/{file}", static),
        Route("/api/session", session, methods=["POST"]), Route("/api/channel", open_channel, methods=["POST"]),
        Route("/gw/{path:path}", relay, methods=["GET", "POST", "DELETE"]),
    ], lifespan=lifespan)
    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args()
    uvicorn.run(create_app(Config()), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
