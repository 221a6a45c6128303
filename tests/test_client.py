"""The SDK's transport against a loopback HTTP server that records what it receives: which requests carry the API
key, the payment state, and how a charge is booked; one signer per channel per process."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cocoon_faas.client import Client
from cocoon_faas.payer import default_payer, forget_payers
from cocoon_faas.settings import get_settings
from cocoon_faas.ton.client import ChannelSigner, PayingClient
from cocoon_faas.ton.keys import PrivateKey, new_mnemonic

CHARGE = 1234
HOLD = 50_000


class Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, dict[str, str]]] = []
    bodies: list[bytes] = []

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(("GET", self.path, dict(self.headers)))
        self._answer(200, {"name": "f", "functions": [], "pricing": {"max_cost_nanoton": HOLD}})

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        self.bodies.append(self.rfile.read(n))
        self.seen.append(("POST", self.path, dict(self.headers)))
        paid = "X-Cocoon-Payment" in self.headers
        self._answer(200, {"ok": True}, {"X-Cocoon-Charge": str(CHARGE)} if paid else {})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Recorder.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_the_test_process_never_reads_the_users_home() -> None:
    home = get_settings().home
    assert home != Path.home() / ".cocoon" and "cocoon-test-home-" in str(home)
    assert not any(k.startswith("COCOON_") and k not in ("COCOON_HOME", "COCOON_MODELS_DIR") for k in os.environ)


def _signer(tmp: Path) -> ChannelSigner:
    return ChannelSigner(tmp / "channels" / "7.json", PrivateKey.generate(), channel_id=7, deposit=10**9)


def test_a_paying_client_sends_no_api_key_unless_asked(server: str, tmp_path: Path) -> None:
    (get_settings().home / "api_key").write_text("found-in-home\n")  # what `scripts/demo` leaves behind
    try:
        payer = PayingClient(_signer(tmp_path))
        with Client(server, payer=payer) as c:
            assert c.call("f", {"x": 1}) == {"ok": True}
            c.functions()  # a control-plane request still carries the key
        with Client(server, api_key="explicit", payer=payer) as c:
            c.call("f", {})
    finally:
        (get_settings().home / "api_key").unlink()
    calls = [(m, p, h) for m, p, h in Recorder.seen if p == "/fn/f"]
    assert len(calls) == 2 and all("X-Cocoon-Payment" in h for _, _, h in calls)
    assert "Authorization" not in calls[0][2]
    assert calls[1][2]["Authorization"] == "Bearer explicit"
    listing = [h for m, p, h in Recorder.seen if p == "/v1/functions"]
    assert listing[0]["Authorization"] == "Bearer found-in-home"
    assert payer.signer.charged == 2 * CHARGE


def test_an_unpaid_client_sends_the_key_from_home(server: str) -> None:
    (get_settings().home / "api_key").write_text("found-in-home\n")
    try:
        with Client(server, payer=None) as c:
            c.call("f", {})
    finally:
        (get_settings().home / "api_key").unlink()
    (_, _, h), = [x for x in Recorder.seen if x[1] == "/fn/f"]
    assert h["Authorization"] == "Bearer found-in-home" and "X-Cocoon-Payment" not in h


def test_one_signer_per_channel_per_process(tmp_path: Path) -> None:
    words = new_mnemonic()
    (tmp_path / "wallet.json").write_text(json.dumps({"words": words}))
    (tmp_path / "channel.json").write_text(json.dumps({"channel_id": 7}))
    ChannelSigner(tmp_path / "channels" / "7.json", PrivateKey.from_mnemonic(words), 7, 10**9)
    try:
        a, b = default_payer(tmp_path), default_payer(tmp_path)
        assert a is not None and a is b
        t = a.signer.sign_for_call(HOLD)
        a.settle(t, {"X-Cocoon-Charge": str(CHARGE)})
        assert b.signer.charged == CHARGE
    finally:
        forget_payers()
    assert default_payer(tmp_path / "nowhere") is None


def test_a_429_is_a_retryable_overloaded_error_in_the_sdk_and_the_proxy() -> None:
    """A sealed call refused for load reaches the SDK as OverloadedError with the gateway's Retry-After, and the
    proxy passes the header on to its OpenAI client (which backs off by it)."""
    import httpx

    from cocoon_faas.errors import OverloadedError
    from cocoon_faas.proxy import _error
    from cocoon_faas.transport import Transport

    body = {"error": {"type": "overloaded", "message": "function 'f' is overloaded", "retry_after": 1}}
    t = Transport("http://127.0.0.1:9", None)
    exc = t.error(httpx.Response(429, json=body, headers={"Retry-After": "1"}))
    t.close()
    assert isinstance(exc, OverloadedError) and str(exc.details["retry_after"]) == "1"
    r = _error(exc)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert json.loads(bytes(r.body))["error"]["type"] == "overloaded"


def test_remote_binds_positional_arguments_as_a_local_call_does(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import cocoon_faas as cocoon
    from cocoon_faas.settings import reload_settings

    @cocoon.function()
    def f(name: str, excited: bool = False) -> dict:
        return {}

    monkeypatch.setenv("COCOON_GATEWAY_URL", server)
    monkeypatch.setenv("COCOON_API_KEY", "k")
    reload_settings()
    try:
        assert f.remote("Ada", excited=True) == {"ok": True}  # was a TypeError: remote() takes keywords only
        assert json.loads(Recorder.bodies[-1]) == {"name": "Ada", "excited": True}
    finally:
        monkeypatch.undo()
        reload_settings()
    assert f.keywords(("Ada", True), {}) == {"name": "Ada", "excited": True}
    with pytest.raises(TypeError, match="both positionally and by keyword"):
        f.keywords(("Ada",), {"name": "Bo"})
    with pytest.raises(TypeError, match="takes 2 argument"):
        f.keywords((1, 2, 3), {})
