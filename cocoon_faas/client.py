"""The SDK client: deploy, call, stream, spawn and manage functions on a gateway.

Errors come back as the same `CocoonError` subclasses the gateway raised (see `errors.py`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from cocoon_faas.settings import Settings, get_settings
from cocoon_faas.transport import FunctionCall, Transport, json_args


def read_local_key(home: Path) -> str | None:
    """The developer key `cocoon serve` wrote under COCOON_HOME on this machine, if any."""
    f = home / "api_key"
    try:
        return f.read_text().strip() or None
    except OSError:
        return None


class Client:
    """Talks to a gateway (default: COCOON_GATEWAY_URL) with an API key (default: the local key file) and/or a
    payer. A call paid from a channel carries no API key unless one is given explicitly (`api_key=` or
    COCOON_API_KEY); control-plane requests always carry the key when there is one."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 330.0,
                 headers: dict[str, str] | None = None, payer: Any = "auto") -> None:
        """`payer`: a `PayingClient` to pay every call from a channel; "auto" (default) uses the channel
        `cocoon channel open` recorded under COCOON_HOME, if any (one signer per process); None sends no
        payment."""
        s = get_settings()
        if payer == "auto":
            from cocoon_faas.payer import default_payer

            payer = default_payer(s.home)
        explicit = api_key or s.api_key
        self.transport = Transport(url or s.gateway_url, explicit or read_local_key(s.home), timeout=timeout,
                                   headers=headers, payer=payer, key_on_paid_calls=bool(explicit))
        self.last_receipt: Any = None  # the verified receipt of the last confidential call

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    def api_key(self) -> str | None:
        return self.transport.api_key

    @property
    def payer(self) -> Any:
        return self.transport.payer

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any] | None = None, *, headers: dict[str, str] | None = None) -> Any:
        """Call a function and return its JSON result."""
        return self.call_raw(name, args, headers=headers).json()

    def call_raw(self, name: str, args: dict[str, Any] | None = None, *,
                 headers: dict[str, str] | None = None) -> httpx.Response:
        # Accept: JSON only, so a generator function is refused with a hint to stream it, before it runs
        return self.transport.call("POST", f"/fn/{name}", name, content=json_args(args),
                                   headers=_json_headers({"Accept": "application/json", **(headers or {})}))

    def spawn(self, name: str, args: dict[str, Any] | None = None) -> FunctionCall:
        r = self.transport.call("POST", f"/fn/{name}", name, content=json_args(args),
                                headers=_json_headers({"Prefer": "respond-async"}))
        return FunctionCall(self.transport, r.json()["id"])

    def hold_for(self, name: str) -> int:
        """The most one call of `name` can cost (the gateway's quote), cached per function."""
        return self.transport.hold_for(name)

    def stream(self, name: str, args: dict[str, Any] | None = None) -> Iterator[Any]:
        """Yield a generator function's items as the gateway relays them (SSE)."""
        for event, data in self.stream_events(name, args):
            if event == "message":
                yield data

    def stream_events(self, name: str, args: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
        for event, raw in self.transport.events(f"/fn/{name}", name, content=json_args(args),
                                                headers=_json_headers()):
            yield event, json.loads(raw or "null")

    # -- confidential calls (cocoon_faas/confidential_client.py, docs/confidential.md) ------------------
    def _policy(self, name: str, policy: Any, allow_dev_attestation: Any, measurement: Any) -> Any:
        from cocoon_faas import confidential_client as cc  # on first use: HPKE, verifiers
        return policy or cc.cached_policy(get_settings().home, self.url, name, measurement=measurement,
                                       allow_dev_attestation=allow_dev_attestation)

    def call_confidential(self, name: str, args: dict[str, Any] | None = None, *, policy: Any = None,
                          allow_dev_attestation: Any = False, measurement: Any = None) -> Any:
        """Call `name` sealed end to end: only replicas whose attestation passes `policy` (default: the
        measurement `cocoon deploy` printed here, TDX; `allow_dev_attestation=True` also trusts this machine's
        NOT SECURE dev key) can read the arguments. The verified receipt is left in `self.last_receipt`."""
        from cocoon_faas import confidential_client as cc  # on first use: HPKE, verifiers
        result, self.last_receipt = cc.call_confidential(
            self.transport, name, args, self._policy(name, policy, allow_dev_attestation, measurement))
        return result

    def stream_confidential(self, name: str, args: dict[str, Any] | None = None, *, policy: Any = None,
                            allow_dev_attestation: Any = False, measurement: Any = None) -> Iterator[Any]:
        """Like `call_confidential` for generator functions: yields each item; ends at the authenticated end."""
        from cocoon_faas import confidential_client as cc  # on first use: HPKE, verifiers
        return cc.stream_confidential(self.transport, name, args,
                                      self._policy(name, policy, allow_dev_attestation, measurement))

    def spawn_confidential(self, name: str, args: dict[str, Any] | None = None, *, policy: Any = None,
                           allow_dev_attestation: Any = False, measurement: Any = None) -> Any:
        """Submit a sealed async call; `.get()` on the handle opens the sealed result."""
        from cocoon_faas import confidential_client as cc  # on first use: HPKE, verifiers
        return cc.spawn_confidential(self.transport, name, args,
                                     self._policy(name, policy, allow_dev_attestation, measurement))

    def get_call(self, call_id: str) -> dict[str, Any]:
        return FunctionCall(self.transport, call_id).status()

    def cancel(self, call_id: str) -> dict[str, Any]:
        return FunctionCall(self.transport, call_id).cancel()

    # -- control plane -----------------------------------------------------------------------------
    def deploy(self, path: str | Path, *, progress: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:
        """Deploy every function in an app file; returns one record per function (url, version, measurement)."""
        from cocoon_faas.bundle import bundle, load_app
        from cocoon_faas.pins import record_deployment

        _, functions = load_app(path)
        out = []
        for fn in functions:
            if progress:
                progress(fn.name, "serializing")
            b = bundle(fn)
            if progress:
                progress(fn.name, "uploading")
            r = self.transport.request("POST", "/v1/deployments", json={"functions": [b.to_json()]})
            rec = r.json()["functions"][0]
            out.append(rec)
            record_deployment(get_settings().home, self.url, rec)  # the measurement confidential calls pin
            if progress:
                progress(fn.name, "done")
        return out

    def functions(self) -> list[dict[str, Any]]:
        return self.transport.request("GET", "/v1/functions").json()["functions"]

    def function(self, name: str) -> dict[str, Any]:
        return self.transport.request("GET", f"/v1/functions/{name}").json()

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        body = {} if version is None else {"version": version}
        return self.transport.request("POST", f"/v1/functions/{name}/rollback", json=body).json()

    def delete(self, name: str) -> dict[str, Any]:
        return self.transport.request("DELETE", f"/v1/functions/{name}").json()

    def logs(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.transport.request("GET", f"/v1/functions/{name}/logs", params={"limit": limit}).json()["logs"]

    def create_key(self, name: str) -> str:
        return self.transport.request("POST", "/v1/keys", json={"name": name}).json()["key"]

    def health(self) -> dict[str, Any]:
        return self.transport.request("GET", "/healthz").json()


def _json_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", **(extra or {})}


_default: tuple[tuple[Any, ...], Client] | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process's one Client for `fn.remote()` / `.stream()` / `.spawn()`: one connection pool and one channel
    signer however many calls are made (a new one is made only when the settings change, e.g. in tests)."""
    global _default
    s: Settings = get_settings()
    key = (id(s), s.gateway_url, str(s.home), s.api_key)
    with _default_lock:
        if _default is None or _default[0] != key:
            _default = (key, Client())
        return _default[1]
