"""The SDK client: deploy, call, stream, spawn and manage functions on a gateway.

Errors come back as the same `CocoonError` subclasses the gateway raised (see `errors.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from cocoon_faas.errors import (
    AuthenticationError,
    CocoonError,
    GatewayUnreachableError,
    InvalidRequestError,
    error_from_body,
)
from cocoon_faas.settings import get_settings

TERMINAL = ("succeeded", "failed", "cancelled")


def read_local_key(home: Path) -> str | None:
    """The developer key `cocoon serve` wrote under COCOON_HOME on this machine, if any."""
    f = home / "api_key"
    try:
        return f.read_text().strip() or None
    except OSError:
        return None


class FunctionCall:
    """Handle on an async call (`fn.spawn()` / `cocoon call --async`)."""

    def __init__(self, client: Client, call_id: str) -> None:
        self.client = client
        self.id = call_id

    def status(self) -> dict[str, Any]:
        return self.client.get_call(self.id)

    def get(self, timeout: float | None = None, poll: float = 0.05) -> Any:
        """Wait for the result; raises the function's error (or CallTimeoutError on `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st["status"] == "succeeded":
                return st.get("result")
            if st["status"] in ("failed", "cancelled"):
                raise error_from_body(500, {"error": st.get("error") or {"type": st["status"], "message": st["status"]}})
            if deadline is not None and time.monotonic() > deadline:
                from cocoon_faas.errors import CallTimeoutError

                raise CallTimeoutError(f"call {self.id} still {st['status']} after {timeout}s")
            time.sleep(poll)
            poll = min(poll * 1.5, 1.0)

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.id)


class Client:
    """Talks to a gateway (default: COCOON_GATEWAY_URL) with an API key (default: the local key file)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 330.0,
                 headers: dict[str, str] | None = None, payer: Any = "auto") -> None:
        """`payer`: a `PayingClient` to pay every call from a channel; "auto" (default) uses the channel
        `cocoon channel open` recorded under COCOON_HOME, if any; None sends no payment."""
        s = get_settings()
        if payer == "auto":
            from cocoon_faas.payer import default_payer

            payer = default_payer(s.home)
        self.payer = payer
        self._holds: dict[str, int] = {}
        self.last_receipt: Any = None  # the verified receipt of the last confidential call
        self.url = (url or s.gateway_url).rstrip("/")
        self.api_key = api_key or s.api_key or read_local_key(s.home)
        h = {"User-Agent": "cocoon-faas"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(headers or {})
        self._http = httpx.Client(base_url=self.url, headers=h, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise GatewayUnreachableError(
                f"cannot reach the gateway at {self.url} ({exc.__class__.__name__}); start it with `cocoon serve` "
                "or set COCOON_GATEWAY_URL"
            ) from None
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def _error(self, r: httpx.Response) -> CocoonError:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        exc = error_from_body(r.status_code, body)
        if isinstance(exc, AuthenticationError) and not self.api_key:
            exc.message += "; no API key found: run `cocoon serve` on this machine or set COCOON_API_KEY"
            exc.args = (exc.message,)
        if r.headers.get("retry-after"):
            exc.details.setdefault("retry_after", r.headers["retry-after"])
        return exc

    # -- calls -------------------------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any] | None = None, *, headers: dict[str, str] | None = None) -> Any:
        """Call a function and return its JSON result."""
        return self.call_raw(name, args, headers=headers).json()

    def call_raw(self, name: str, args: dict[str, Any] | None = None, *,
                 headers: dict[str, str] | None = None) -> httpx.Response:
        return self._paid("POST", f"/fn/{name}", name, content=_body(args), headers=_json_headers(headers))

    def spawn(self, name: str, args: dict[str, Any] | None = None) -> FunctionCall:
        r = self._paid("POST", f"/fn/{name}", name, content=_body(args),
                       headers=_json_headers({"Prefer": "respond-async"}))
        return FunctionCall(self, r.json()["id"])

    def hold_for(self, name: str) -> int:
        """The most one call of `name` can cost (the gateway's quote), cached per function."""
        if name not in self._holds:
            self._holds[name] = int(self.function(name)["pricing"]["max_cost_nanoton"])
        return self._holds[name]

    def _paid(self, method: str, path: str, name: str, **kw: Any) -> httpx.Response:
        """A request that carries a signed channel state when this client pays; books the charge after."""
        if self.payer is None:
            return self._request(method, path, **kw)
        pay, ticket = self.payer.headers(self.hold_for(name))
        kw["headers"] = {**kw.get("headers", {}), **pay}
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            self.payer.settle(ticket, None)
            raise GatewayUnreachableError(f"cannot reach the gateway at {self.url} ({exc})") from None
        self.payer.settle(ticket, dict(r.headers))
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def stream(self, name: str, args: dict[str, Any] | None = None) -> Iterator[Any]:
        """Yield a generator function's items as the gateway relays them (SSE)."""
        for event, data in self.stream_events(name, args):
            if event == "message":
                yield data

    def stream_events(self, name: str, args: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
        headers = _json_headers({"Accept": "text/event-stream"})
        ticket, charged = None, 0
        if self.payer is not None:  # paid streams: the charge comes in the `end` event (headers went out first)
            pay, ticket = self.payer.headers(self.hold_for(name))
            headers.update(pay)
        try:
            with self._http.stream("POST", f"/fn/{name}", content=_body(args), headers=headers) as r:
                if r.status_code >= 400:
                    r.read()
                    charged = int(r.headers.get("x-cocoon-charge") or 0)
                    raise self._error(r)
                event = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:].strip() or "null")
                        if event == "error":
                            raise error_from_body(500, data)
                        if event == "end" and isinstance(data, dict):
                            charged = int(data.get("charge") or 0)
                        yield event, data
                        if event == "end":
                            return
                        event = "message"
        except httpx.TransportError as exc:
            raise GatewayUnreachableError(f"stream from {self.url} broke off: {exc}") from None
        finally:
            if ticket is not None:
                self.payer.settle(ticket, {"X-Cocoon-Charge": str(charged)})

    # -- confidential calls (cocoon_faas/confidential_client.py, docs/confidential.md) ------------------
    def _policy(self, name: str, policy: Any, allow_dev_attestation: Any, measurement: Any) -> Any:
        from cocoon_faas.confidential_client import cached_policy

        return policy or cached_policy(get_settings().home, self.url, name, measurement=measurement,
                                       allow_dev_attestation=allow_dev_attestation)

    def call_confidential(self, name: str, args: dict[str, Any] | None = None, *, policy: Any = None,
                          allow_dev_attestation: Any = False, measurement: Any = None) -> Any:
        """Call `name` sealed end to end: only replicas whose attestation passes `policy` (default: the
        measurement `cocoon deploy` printed here, TDX; `allow_dev_attestation=True` also trusts this machine's
        NOT SECURE dev key) can read the arguments. The verified receipt is left in `self.last_receipt`."""
        from cocoon_faas.confidential_client import call_confidential

        result, self.last_receipt = call_confidential(
            self, name, args, self._policy(name, policy, allow_dev_attestation, measurement))
        return result

    def stream_confidential(self, name: str, args: dict[str, Any] | None = None, *, policy: Any = None,
                            allow_dev_attestation: Any = False, measurement: Any = None) -> Iterator[Any]:
        """Like `call_confidential` for generator functions: yields each item; ends at the authenticated end."""
        from cocoon_faas.confidential_client import stream_confidential

        return stream_confidential(self, name, args, self._policy(name, policy, allow_dev_attestation, measurement))

    def spawn_confidential(self, name: str, args: dict[str, Any] | None = None, *, policy: Any = None,
                           allow_dev_attestation: Any = False, measurement: Any = None) -> Any:
        """Submit a sealed async call; `.get()` on the handle opens the sealed result."""
        from cocoon_faas.confidential_client import spawn_confidential

        return spawn_confidential(self, name, args, self._policy(name, policy, allow_dev_attestation, measurement))

    def get_call(self, call_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/calls/{call_id}").json()

    def cancel(self, call_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/calls/{call_id}").json()

    # -- control plane -----------------------------------------------------------------------------
    def deploy(self, path: str | Path, *, progress: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:
        """Deploy every function in an app file; returns one record per function (url, version, measurement)."""
        from cocoon_faas.bundle import bundle, load_app

        _, functions = load_app(path)
        out = []
        for fn in functions:
            if progress:
                progress(fn.name, "serializing")
            b = bundle(fn)
            if progress:
                progress(fn.name, "uploading")
            r = self._request("POST", "/v1/deployments", json={"functions": [b.to_json()]})
            rec = r.json()["functions"][0]
            out.append(rec)
            from cocoon_faas.confidential_client import record_deployment

            record_deployment(get_settings().home, self.url, rec)  # the measurement confidential calls pin
            if progress:
                progress(fn.name, "done")
        return out

    def functions(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/functions").json()["functions"]

    def function(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/functions/{name}").json()

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        body = {} if version is None else {"version": version}
        return self._request("POST", f"/v1/functions/{name}/rollback", json=body).json()

    def delete(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/functions/{name}").json()

    def logs(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/functions/{name}/logs", params={"limit": limit}).json()["logs"]

    def create_key(self, name: str) -> str:
        return self._request("POST", "/v1/keys", json={"name": name}).json()["key"]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()


def _body(args: dict[str, Any] | None) -> bytes:
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidRequestError(f"call arguments must be a dict of keyword arguments, got {type(args).__name__}")
    return json.dumps(args).encode()


def _json_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    h.update(extra or {})
    return h
