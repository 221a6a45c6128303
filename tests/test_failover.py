"""Clients with several gateway URLs: what moves on to the next gateway, and with which call id.

Real sockets on 127.0.0.1: a closed port (never reached), a server that reads the request and drops the
connection (reached, no answer), and a server that answers and records what it received."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cocoon_faas.errors import GatewayUnreachableError
from cocoon_faas.settings import Settings
from cocoon_faas.transport import Transport, gateway_urls


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes


class _Server:
    def __init__(self, drop: bool) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                outer.seen.append((self.command, self.path, self.headers.get("x-cocoon-call-id")))
                if drop:  # reached, then gone before answering (a gateway SIGKILLed mid-call)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = json.dumps({"ok": True, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    live, dropper = _Server(drop=False), _Server(drop=True)
    yield live, dropper
    live.close()
    dropper.close()


def test_urls_parse_and_settings_accept_a_list():
    assert gateway_urls(" http://a:1/, http://b:2 ") == ["http://a:1", "http://b:2"]
    assert Settings(gateway_url="http://a:1/,http://b:2/").gateway_url == "http://a:1,http://b:2"
    with pytest.raises(ValueError, match="url1,url2"):
        Settings(gateway_url="http://a:1,ftp://b")


def test_not_started_requests_move_on_and_sent_posts_do_not(servers):
    live, dropper = servers
    t = Transport(f"{_closed_port()},{live.url}", "k")
    assert t.request("POST", "/v1/keys", json={}).json()["ok"]  # never reached the first: safe to send on
    assert live.seen[-1][:2] == ("POST", "/v1/keys") and t.current_url == live.url
    t.close()
    t = Transport(f"{dropper.url},{live.url}", "k")
    with pytest.raises(GatewayUnreachableError):
        t.request("POST", "/v1/deployments", json={})  # it may have been applied: not resent
    assert [s[1] for s in dropper.seen] == ["/v1/deployments"] and not live.seen[1:]
    assert t.request("GET", "/v1/functions").json()["ok"]  # idempotent: resent to the next gateway
    assert live.seen[-1][:2] == ("GET", "/v1/functions")
    t.close()


def test_calls_are_resent_with_the_same_call_id(servers):
    live, dropper = servers
    t = Transport(f"{dropper.url},{live.url}", "k")
    r = t.call("POST", "/fn/echo", "echo", content=b"{}")
    assert r.json()["ok"]
    (m1, p1, id1), = dropper.seen
    (m2, p2, id2), = live.seen
    assert (m1, p1) == (m2, p2) == ("POST", "/fn/echo")
    assert id1 is not None and id1 == id2 and len(id1) == 32  # one id: the gateways can refuse a second run
    t.call("POST", "/fn/echo", "echo", content=b"{}")
    assert live.seen[-1][2] != id1  # a new call gets a new id
    t.close()


def test_all_gateways_down_names_them():
    t = Transport(f"{_closed_port()},{_closed_port()}", None)
    with pytest.raises(GatewayUnreachableError, match="tried each"):
        t.request("GET", "/healthz")
    t.close()
