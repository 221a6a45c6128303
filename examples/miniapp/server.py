"""The Mini App's small backend: serves the page and the SDK bundle, validates Telegram's initData, opens a paid
channel per Telegram user on their behalf, and relays the browser's calls to the gateway as opaque bytes.

Run:  MINIAPP_BOT_TOKEN=123:abc COCOON_GATEWAY_URL=http://127.0.0.1:8000 python examples/miniapp/server.py --port 8080
and set the bot's Mini App URL (BotFather) to this server (HTTPS in production).

    GET  /                     the page (static/index.html, static/app.js); the SDK at /sdk/cocoon-sdk.js
    POST /api/session          {"init_data"} -> the Telegram user, the function, the attestation policy, the channel
    *    /gw/...               a relay to the gateway for exactly: POST /fn/{name}, GET /v1/functions/{name}[/attestation],
                               GET|DELETE /v1/calls/{id}. It forwards bytes: sealed calls stay sealed (it never has a key)

What this server can and cannot do: it sees sealed envelopes, sizes and timing, never a prompt or an answer (the
browser seals to the attested replica and opens the answer itself). It could lie about the attestation documents it
relays — the browser then refuses to send (try MINIAPP_TAMPER_ATTESTATION=1). It hands the browser the channel's
signing key, so it could also spend from that channel: it funded it. A production Mini App would let the browser
make the key and sign the channel's init message itself; the local development chain keeps this example short.
Settings (environment): MINIAPP_BOT_TOKEN (required), COCOON_GATEWAY_URL, MINIAPP_FUNCTION (Chat.generate),
MINIAPP_DATA (per-user wallets; ./miniapp-data), MINIAPP_DEPOSIT_TON (1), MINIAPP_TRUSTED_DEV_KEY (hex: trust this
NOT SECURE development attestation key; unset: TDX only), MINIAPP_MAX_AGE_S (3600), MINIAPP_CAPTURE (append every
relayed body here: audits and the test that no plaintext reaches this server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
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


def _cli(home: Path, cfg: Config, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_") or k == "COCOON_CHAIN_PATH"}
    env.update(COCOON_HOME=str(home), COCOON_GATEWAY_URL=cfg.gateway)
    r = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"cocoon {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return dict(json.loads(r.stdout))


def open_channel(cfg: Config, user_id: int) -> dict[str, Any]:
    """The user's channel (opened, funded from the local development chain's faucet, on first use)."""
    from cocoon_faas.ton.keys import PrivateKey

    home = cfg.data / "users" / str(user_id)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "channel.json").exists():
        _cli(home, cfg, "wallet", "create")
        _cli(home, cfg, "wallet", "faucet", str(float(cfg.deposit) + 1))
        _cli(home, cfg, "channel", "open", "--deposit", cfg.deposit)
    ch = json.loads((home / "channel.json").read_text())
    seed = PrivateKey.from_mnemonic(json.loads((home / "wallet.json").read_text())["words"]).to_bytes()
    return {"channel_id": str(ch["channel_id"]), "key": seed.hex()}


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

    async def session(request: Request) -> Response:
        try:
            body = await request.json()
            user = validate_init_data(str(body.get("init_data", "")), cfg.bot_token, max_age_s=cfg.max_age)
        except InitDataError as exc:
            return JSONResponse({"error": {"type": "init_data", "reason": exc.reason, "message": str(exc)}}, 401)
        except ValueError:
            return JSONResponse({"error": {"type": "invalid_request", "message": "send {\"init_data\": ...}"}}, 400)
        async with locks.setdefault(user.id, asyncio.Lock()):
            channel = await asyncio.to_thread(open_channel, cfg, user.id)
        fn = (await client.get(f"{cfg.gateway}/v1/functions/{cfg.function}")).json()
        summary = (await client.get(f"{cfg.gateway}/v1/channels/{channel['channel_id']}")).json()
        return JSONResponse({
            "user": {"id": user.id, "first_name": user.first_name, "username": user.username},
            "function": cfg.function,
            # The policy the browser verifies documents against: the measurement the gateway publishes for the
            # function (a production page would pin it in its own static code) and, for development, a dev key.
            "policy": {"measurements": [fn.get("measurement")], "trustedDevKeys": [cfg.dev_key] if cfg.dev_key else []},
            "channel": {**channel, "deposit": str(summary.get("deposit", 0)), "seqno": str(summary.get("seqno", 0)),
                        "sent": str(summary.get("sent", 0)), "charged": str(summary.get("charged", 0))},
        })

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
        Route("/api/session", session, methods=["POST"]),
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
