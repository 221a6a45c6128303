"""The SDK's one way to talk to a gateway: requests, paid requests, SSE streams and error mapping.

`Client` and the confidential client both go through a `Transport`, so a paid call, a paid stream and a sealed
call attach the payment, book the charge and map errors the same way.

Several gateways: the URL may list several (``COCOON_GATEWAY_URL=http://a:8000,http://b:8000``). A request that
never reached a gateway (connection refused or timed out) moves on to the next one; so does a request that was
sent when it is idempotent (GET, DELETE) or a function call, which carries a call id the client chose
(``X-Cocoon-Call-Id``): a gateway that already saw that id refuses it (409), so a call is executed and charged at
most once however often it is retried.

The API key goes on control-plane requests (deploy, logs, keys, ...). A call that is paid from a channel carries
no API key unless the caller set one explicitly (`api_key=` or COCOON_API_KEY): a caller who pays is not a
developer, and a key found lying in COCOON_HOME must not make its calls look like that developer's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from cocoon_faas.errors import (
    AuthenticationError,
    CallTimeoutError,
    CocoonError,
    GatewayUnreachableError,
    InvalidRequestError,
    error_from_body,
)
from cocoon_faas.pricing import CHARGE_HEADER

if TYPE_CHECKING:  # a payer is made by cocoon_faas/payer.py; unpaid calls never load the TON client
    from cocoon_faas.ton.client import PayingClient, Ticket

TERMINAL = ("succeeded", "failed", "cancelled")
CALL_ID_HEADER = "X-Cocoon-Call-Id"
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the gateway never saw the request


def gateway_urls(url: str) -> list[str]:
    """``"http://a:8000, http://b:8000/"`` -> ``["http://a:8000", "http://b:8000"]``."""
    urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    if not urls:
        raise InvalidRequestError("no gateway URL given; set COCOON_GATEWAY_URL (several: url1,url2)")
    return urls


def json_args(args: dict[str, Any] | None) -> bytes:
    """A call's keyword arguments as the JSON object the gateway expects."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidRequestError(f"call arguments must be a dict of keyword arguments, got {type(args).__name__}")
    return json.dumps(args).encode()


class Transport:
    """HTTP connection pools to the gateway(s), with the caller's credentials (API key and/or payer)."""

    def __init__(self, url: str, api_key: str | None, *, timeout: float = 330.0,
                 headers: dict[str, str] | None = None, payer: PayingClient | None = None,
                 key_on_paid_calls: bool = False) -> None:
        self.urls = gateway_urls(url)
        self.url = self.urls[0]  # the gateway this client names itself by (deployment pins are kept per URL)
        self.api_key = api_key
        self.payer = payer
        self.key_on_paid_calls = key_on_paid_calls
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients = [httpx.Client(base_url=u, headers={"User-Agent": "cocoon-faas", **(headers or {})},
                                      timeout=timeout) for u in self.urls]
        self._cur = 0
        self._holds: dict[str, int] = {}

    @property
    def _http(self) -> httpx.Client:
        return self._clients[self._cur]

    @property
    def current_url(self) -> str:
        return self.urls[self._cur]

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def _send(self, method: str, path: str, *, resend: bool, **kw: Any) -> httpx.Response:
        """Send to the current gateway, moving on to the next when it cannot be reached; after the request went
        out, only when `resend` (idempotent, or protected by a call id)."""
        start, n = self._cur, len(self.urls)
        for attempt in range(n):
            i = (start + attempt) % n  # each gateway once, in order (threads share `_cur`: never go back)
            try:
                r = self._clients[i].request(method, path, **kw)
            except httpx.TransportError as exc:
                if attempt == n - 1 or not (resend or isinstance(exc, _NOT_SENT)):
                    raise
                continue
            self._cur = i
            return r
        raise AssertionError("unreachable")

    # -- errors ----------------------------------------------------------------------------------------
    def error(self, r: httpx.Response) -> CocoonError:
        """The gateway's JSON error as the matching CocoonError subclass."""
        try:
            body = r.json()
        except ValueError:
            body = r.text
        exc = error_from_body(r.status_code, body)
        if isinstance(exc, AuthenticationError) and not self.api_key:
            exc.message += ("; no API key found: run `cocoon serve` on this machine, set COCOON_API_KEY, or pay "
                            "with a channel (`cocoon channel open --deposit 5`)")
            exc.args = (exc.message,)
        if r.headers.get("retry-after"):
            exc.details.setdefault("retry_after", r.headers["retry-after"])
        return exc

    def _unreachable(self, exc: Exception, what: str = "cannot reach the gateway at") -> GatewayUnreachableError:
        where = self.current_url if len(self.urls) == 1 else f"{', '.join(self.urls)} (tried each)"
        return GatewayUnreachableError(f"{what} {where} ({exc.__class__.__name__}: {exc}); start it with "
                                       "`cocoon serve` or set COCOON_GATEWAY_URL")

    def _headers(self, paying: bool, extra: dict[str, str] | None) -> dict[str, str]:
        auth = self._auth if (not paying or self.key_on_paid_calls) else {}
        return {**auth, **(extra or {})}

    # -- plain requests ----------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                **kw: Any) -> httpx.Response:
        """A request with the API key; raises the mapped error on a 4xx/5xx."""
        try:
            r = self._send(method, path, resend=method in ("GET", "HEAD", "DELETE", "PUT"),
                           headers=self._headers(False, headers), **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if r.status_code >= 400:
            raise self.error(r)
        return r

    def hold_for(self, name: str) -> int:
        """The most one call of `name` can cost (the gateway's quote), asked once per function."""
        if name not in self._holds:
            self._holds[name] = int(self.request("GET", f"/v1/functions/{name}").json()["pricing"]["max_cost_nanoton"])
        return self._holds[name]

    def _pay(self, name: str, headers: dict[str, str] | None) -> tuple[dict[str, str], Ticket | None]:
        if self.payer is None:
            return self._headers(False, headers), None
        pay, ticket = self.payer.headers(self.hold_for(name))
        return {**self._headers(True, headers), **pay}, ticket

    def call(self, method: str, path: str, name: str, *, headers: dict[str, str] | None = None,
             **kw: Any) -> httpx.Response:
        """A call of function `name`: paid from the channel when this transport has a payer (the charge the
        gateway reports is booked), else with the API key."""
        h, ticket = self._pay(name, headers)
        h.setdefault(CALL_ID_HEADER, os.urandom(16).hex())  # makes resending it to another gateway safe
        try:
            r = self._send(method, path, resend=True, headers=h, **kw)
        except httpx.TransportError as exc:
            if ticket is not None:
                assert self.payer is not None
                self.payer.settle(ticket, None)
            raise self._unreachable(exc) from None
        if ticket is not None:
            assert self.payer is not None
            self.payer.settle(ticket, {CHARGE_HEADER: r.headers.get(CHARGE_HEADER, "0")})
        if r.status_code >= 400:
            raise self.error(r)
        return r

    def events(self, path: str, name: str, *, content: Any, headers: dict[str, str] | None = None
               ) -> Iterator[tuple[str, str]]:
        """POST and yield the SSE (event, raw data) pairs until `end`; an `error` event raises. A paid stream's
        charge comes in the `end` event (the headers went out before it was known) and is booked then."""
        h, ticket = self._pay(name, {"Accept": "text/event-stream", **(headers or {})})
        h.setdefault(CALL_ID_HEADER, os.urandom(16).hex())
        charged = 0
        try:
            with self._open_stream(path, content, h) as r:
                if r.status_code >= 400:
                    r.read()
                    charged = int(r.headers.get(CHARGE_HEADER) or 0)
                    raise self.error(r)
                event = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = line[5:].strip()
                        if event == "error":
                            raise error_from_body(500, json.loads(data or "null"))
                        if event == "end":
                            end = json.loads(data or "null")
                            if isinstance(end, dict):
                                charged = int(end.get("charge") or 0)
                        yield event, data
                        if event == "end":
                            return
                        event = "message"
        except httpx.TransportError as exc:
            raise self._unreachable(exc, "the stream broke off from") from None
        finally:
            if ticket is not None:
                assert self.payer is not None
                self.payer.settle(ticket, {CHARGE_HEADER: str(charged)})

    @contextmanager
    def _open_stream(self, path: str, content: Any, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """A stream on the first gateway that can be reached (a stream is never resent once it has started)."""
        start, n = self._cur, len(self.urls)
        for attempt in range(n):
            i = (start + attempt) % n
            cm = self._clients[i].stream("POST", path, content=content, headers=headers)
            try:
                r = cm.__enter__()
            except _NOT_SENT:
                if attempt == n - 1:
                    raise
                continue
            self._cur = i
            try:
                yield r
            finally:
                cm.__exit__(None, None, None)
            return

    # -- async calls ---------------------------------------------------------------------------------------
    def poll(self, call_id: str, timeout: float | None = None, poll: float = 0.05) -> dict[str, Any]:
        """Wait until an async call ends; its final view. Raises the call's error (CallTimeoutError on
        `timeout`); the view of a failed call rides along in the error's details as `call`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st: dict[str, Any] = self.request("GET", f"/v1/calls/{call_id}").json()
            if st["status"] == "succeeded":
                return st
            if st["status"] in ("failed", "cancelled"):
                raise error_from_body(500, {"error": st.get("error") or {"type": st["status"],
                                                                         "message": st["status"]}})
            if deadline is not None and time.monotonic() > deadline:
                raise CallTimeoutError(f"call {call_id} still {st['status']} after {timeout}s")
            time.sleep(poll)
            poll = min(poll * 1.5, 1.0)


class FunctionCall:
    """Handle on an async call (`fn.spawn()` / `cocoon call --async`)."""

    def __init__(self, transport: Transport, call_id: str) -> None:
        self.transport = transport
        self.id = call_id

    def status(self) -> dict[str, Any]:
        return dict(self.transport.request("GET", f"/v1/calls/{self.id}").json())

    def get(self, timeout: float | None = None, poll: float = 0.05) -> Any:
        """Wait for the result; raises the function's error (or CallTimeoutError on `timeout`)."""
        return self.transport.poll(self.id, timeout, poll).get("result")

    def cancel(self) -> dict[str, Any]:
        return dict(self.transport.request("DELETE", f"/v1/calls/{self.id}").json())

