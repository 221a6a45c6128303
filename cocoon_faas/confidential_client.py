"""The SDK side of confidential calls and deployments, over `cocoon_faas.confidential` (docs/confidential.md).

Calls: fetch the attestation documents of the function's live replicas, verify each against the caller's policy
(by default: the measurement `cocoon deploy` printed on this machine, recorded in `$COCOON_HOME/deployments.json`,
and TDX evidence; `dev` evidence only with `allow_dev_attestation`, which trusts the development key under this
machine's COCOON_HOME or the hex keys given), seal the arguments to every verified replica and open the sealed
answer (receipt checked). Verified replicas are cached until their documents near expiry; a `421 stale_keys`
drops the cache, refetches and reseals once, transparently.

Deployments (`deploy_confidential`): each function's code blob is sealed under a fresh code key whose release
policy pins its measurement; the gateway stores only ciphertext. The key stays under `$COCOON_HOME/code_keys/`
(0600); `release_code_keys` grants it to each replica whose document passes that policy (the deploying CLI does
this at once; replicas started later get it from a peer, see gateway/routes_attest.py).
"""

from __future__ import annotations

import base64
import json
import os
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cocoon_faas.confidential import (
    SEALED_CONTENT_TYPE,
    SEALED_FRAME_CONTENT_TYPE,
    CheckFailed,
    ClientCallContext,
    ClientPolicy,
    EnvelopeError,
    Receipt,
    VerifiedReplica,
    grant_code_key,
    seal_code,
    seal_request,
    verify_document,
)
from cocoon_faas.confidential.document import DEV_KEY_FILE, dev_public_key_hex
from cocoon_faas.errors import AttestationError, CocoonError, InvalidRequestError, StaleKeysError
from cocoon_faas.pins import DEPLOYMENTS_FILE, pinned_measurement, record_deployment
from cocoon_faas.settings import get_settings
from cocoon_faas.signature import Signature
from cocoon_faas.transport import Transport, json_args

CODE_KEYS_DIR = "code_keys"
_cache: weakref.WeakKeyDictionary[Any, dict[Any, tuple[float, list[VerifiedReplica]]]] = weakref.WeakKeyDictionary()
# the deployed signature the gateway lists beside the documents, per client and function: sealed arguments are
# checked against it on this device, before anything is sealed or paid (the gateway cannot read them to check)
_signatures: weakref.WeakKeyDictionary[Any, dict[str, Signature]] = weakref.WeakKeyDictionary()


# -- deployment records (what `cocoon deploy` printed, pinned by default) ------------------------------------

def local_dev_key(home: Path) -> str:
    """The public half of this machine's development attestation key (hex); never creates one."""
    path = Path(home) / DEV_KEY_FILE
    try:
        raw = path.read_bytes()
    except OSError:
        raise AttestationError(f"no development attestation key at {path}: --allow-dev-attestation trusts the key "
                               "of a gateway on this machine (same COCOON_HOME); pass its public key in "
                               "allow_dev_attestation=['<hex>'] otherwise") from None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return dev_public_key_hex(Ed25519PrivateKey.from_private_bytes(raw))


_policies: dict[Any, tuple[float, ClientPolicy]] = {}


def cached_policy(home: Path, gateway_url: str, name: str, *, measurement: Any = None,
                  allow_dev_attestation: Any = False) -> ClientPolicy:
    """`build_policy`, memoized until deployments.json changes (a redeploy re-pins the measurement)."""
    try:
        mtime = os.stat(os.path.join(home, DEPLOYMENTS_FILE)).st_mtime_ns  # no pathlib: this runs per call
    except OSError:
        mtime = 0
    m = measurement if measurement is None or isinstance(measurement, str) else tuple(measurement)
    d = allow_dev_attestation if isinstance(allow_dev_attestation, (bool, str)) else tuple(allow_dev_attestation)
    key = (str(home), gateway_url, name, m, d)
    hit = _policies.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    pol = build_policy(home, gateway_url, name, measurement=measurement, allow_dev_attestation=allow_dev_attestation)
    _policies[key] = (mtime, pol)
    return pol


def build_policy(home: Path, gateway_url: str, name: str, *, measurement: str | Iterable[str] | None = None,
                 allow_dev_attestation: bool | str | Iterable[str] = False) -> ClientPolicy:
    """The default policy for calling `name`: the pinned (or given) measurement, TDX evidence, plus dev evidence
    signed by trusted keys when `allow_dev_attestation` (True: this machine's dev key; else hex keys)."""
    ms: list[str]
    if measurement is None:
        pinned = pinned_measurement(home, gateway_url, name)
        if pinned is None:
            raise AttestationError(f"no measurement pinned for {name!r} on {gateway_url}: deploy it from this "
                                   "machine with `cocoon deploy`, or pass the measurement `cocoon deploy` printed "
                                   "(measurement=... / --measurement HEX)")
        ms = [pinned]
    else:
        ms = [measurement] if isinstance(measurement, str) else list(measurement)
    if allow_dev_attestation is True:
        dev = [local_dev_key(home)]
    elif allow_dev_attestation is False:
        dev = []
    elif isinstance(allow_dev_attestation, str):
        dev = [allow_dev_attestation]
    else:
        dev = list(allow_dev_attestation)
    return ClientPolicy.build(ms, allow_dev_keys=dev, function=name)


# -- calls ---------------------------------------------------------------------------------------------------

def _policy_key(name: str, p: ClientPolicy) -> Any:
    return (name, p.measurements, p.tee_kinds, p.trusted_dev_keys, p.require_gpu, repr(p.tdx),
            None if p.collateral is None else id(p.collateral), None if p.root is None else id(p.root))


def verified_replicas(client: Transport, name: str, policy: ClientPolicy, refresh: bool = False) -> list[VerifiedReplica]:
    """The function's live replicas whose documents pass `policy` (cached until 60 s before the first expiry)."""
    cache = _cache.setdefault(client, {})
    key = _policy_key(name, policy)
    hit = cache.get(key)
    now = time.time()
    if hit is not None and not refresh and hit[0] > now:
        return hit[1]
    listing = client.request("GET", f"/v1/functions/{name}/attestation").json()
    docs = listing.get("documents", [])
    _remember_signature(client, name, listing.get("signature"))
    good: list[VerifiedReplica] = []
    refused: list[CheckFailed] = []
    for d in docs:
        try:
            good.append(verify_document(d, policy, now))
        except CheckFailed as exc:
            refused.append(exc)
    if not good:
        cache.pop(key, None)
        if refused:
            if refused[0].check == "tee_kind" and all(d.get("tee") == "dev" for d in docs):
                raise CheckFailed("tee_kind", f"the replicas of {name!r} offer only development attestation "
                                  "(NOT SECURE, no TEE); to trust it anyway pass --allow-dev-attestation "
                                  "(allow_dev_attestation=True)")
            raise refused[0]
        raise AttestationError(f"function {name!r} has no live replica documents to seal to; retry shortly")
    cache[key] = (min(r.expires_at for r in good) - 60.0, good)
    return good


def _remember_signature(client: Transport, name: str, raw: Any) -> None:
    sigs = _signatures.setdefault(client, {})
    try:
        sigs[name] = Signature.from_json(raw)
    except InvalidRequestError:  # an older gateway lists none (or a malformed one): the replica's own check stands
        sigs.pop(name, None)


def check_sealed_args(client: Transport, name: str, args: dict[str, Any] | None) -> None:
    """Raise InvalidRequestError naming an unknown, missing or mistyped argument, as the gateway does for plain
    calls: a sealed call's arguments are checked here, on the caller's device, so a typo is never sealed, sent or
    charged. Call after `verified_replicas`, which fetches the signature."""
    sig = _signatures.get(client, {}).get(name)
    if sig is not None:
        sig.check(name, {} if args is None else args)


def _seal(client: Transport, name: str, args: dict[str, Any] | None, args_json: bytes, policy: ClientPolicy,
          attempt: int) -> tuple[bytearray, ClientCallContext]:
    """The sealed body of one attempt: the verified replicas (refetched on a retry), the arguments checked, sealed."""
    replicas = verified_replicas(client, name, policy, refresh=attempt > 0)
    check_sealed_args(client, name, args)
    return seal_request(args_json, name, replicas)


def _sealed_headers(body: bytearray, extra: dict[str, str] | None) -> dict[str, str]:
    """The body goes as one chunk of the buffer it was sealed into (no copy); the explicit length keeps httpx
    from switching to chunked transfer encoding."""
    return {"Content-Type": SEALED_CONTENT_TYPE, "Content-Length": str(len(body)), **(extra or {})}


def _sealed_post(client: Transport, name: str, args: dict[str, Any] | None, policy: ClientPolicy,
                 headers: dict[str, str] | None = None) -> tuple[Any, ClientCallContext]:
    """POST a sealed request (paid like any call); on 421 stale_keys refetch the documents and reseal once."""
    args_json = json_args(args)
    for attempt in (0, 1):
        body, ctx = _seal(client, name, args, args_json, policy, attempt)
        try:
            r = client.call("POST", f"/fn/{name}", name, content=[body], headers=_sealed_headers(body, headers))
        except StaleKeysError:
            if attempt:
                raise
            continue
        return r, ctx
    raise AssertionError("unreachable")


def call_confidential(client: Transport, name: str, args: dict[str, Any] | None, policy: ClientPolicy
                      ) -> tuple[Any, Receipt]:
    """(result, verified receipt) of a sealed call."""
    # one sealed frame, not a stream: a generator is then refused with a hint to stream it, before it runs
    r, ctx = _sealed_post(client, name, args, policy, {"Accept": SEALED_FRAME_CONTENT_TYPE})
    result_json, receipt = ctx.open_response(r.content)
    return json.loads(result_json), receipt


class SealedCall:
    """Handle on an async sealed call: the gateway's call record holds only the sealed frame."""

    def __init__(self, client: Transport, call_id: str, ctx: ClientCallContext) -> None:
        self.client, self.id, self.ctx = client, call_id, ctx
        self.receipt: Receipt | None = None

    def get(self, timeout: float | None = None, poll: float = 0.05) -> Any:
        try:
            st = self.client.poll(self.id, timeout, poll)
        except CocoonError as exc:
            frame = exc.details.get("sealed_frame")
            if not frame:
                raise
            self.ctx.open_response(base64.b64decode(frame))  # raises the sealed FunctionError
            raise
        result_json, self.receipt = self.ctx.open_response(base64.b64decode(st["result"]["sealed_frame"]))
        return json.loads(result_json)


def spawn_confidential(client: Transport, name: str, args: dict[str, Any] | None, policy: ClientPolicy) -> SealedCall:
    r, ctx = _sealed_post(client, name, args, policy, {"Prefer": "respond-async"})
    return SealedCall(client, r.json()["id"], ctx)


def stream_confidential(client: Transport, name: str, args: dict[str, Any] | None, policy: ClientPolicy
                        ) -> Iterator[Any]:
    """Yield a sealed stream's items in order (paid like any call); ends only at the authenticated end frame."""
    args_json = json_args(args)
    for attempt in (0, 1):
        body, ctx = _seal(client, name, args, args_json, policy, attempt)
        try:
            for event, data in client.events(f"/fn/{name}", name, content=[body], headers=_sealed_headers(body, None)):
                if event == "frame":
                    opened = ctx.open_chunk(base64.b64decode(data))
                    if not isinstance(opened, Receipt):
                        yield json.loads(opened)
        except StaleKeysError:
            if attempt:
                raise
            continue
        if not ctx.finished:
            raise EnvelopeError("truncated", "the sealed stream ended without its authenticated end frame")
        return


# -- confidential deployments ----------------------------------------------------------------------------------

def _local_key(home: Path) -> str | None:
    try:
        return (Path(home) / "api_key").read_text().strip() or None
    except OSError:
        return None


def _key_paths(home: Path, name: str, measurement: str) -> tuple[Path, Path]:
    d = Path(home) / CODE_KEYS_DIR
    stem = f"{name}-{measurement[:16]}"
    return d / f"{stem}.key", d / f"{stem}.sealed"


def _save_code_key(home: Path, name: str, measurement: str, key: bytes, sealed: bytes) -> None:
    kp, sp = _key_paths(home, name, measurement)
    kp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    sp.write_bytes(sealed)


def release_code_keys(client: Transport, name: str, measurement: str, home: Path) -> dict[str, Any]:
    """Grant the code key to every locked replica of `name` whose document passes the sealed code's policy."""
    kp, sp = _key_paths(home, name, measurement)
    try:
        key, sealed = kp.read_bytes(), sp.read_bytes()
    except OSError:
        raise AttestationError(f"no code key for {name!r} ({measurement[:16]}...) under {kp.parent}; only the "
                               "machine that ran `cocoon deploy --confidential` can release it") from None
    att = client.request("GET", f"/v1/functions/{name}/attestation").json()
    locked = {r["key_id"] for r in att.get("replicas", []) if r.get("code_locked")}
    grants: dict[str, str] = {}
    refused: dict[str, str] = {}
    for doc in att.get("documents", []):
        if doc.get("key_id") not in locked:
            continue
        try:
            grant, _ = grant_code_key(key, sealed, doc)
        except CheckFailed as exc:
            refused[str(doc.get("key_id"))] = exc.message
            continue
        grants[doc["key_id"]] = base64.b64encode(grant).decode()
    out: dict[str, Any] = {"unlocked": [], "failed": dict(refused)}
    if grants:
        res = client.request("POST", f"/v1/functions/{name}/grants", json={"grants": grants}).json()
        out["unlocked"] = res.get("unlocked", [])
        out["failed"].update(res.get("failed", {}))
    return out


def deploy_confidential(path: str | Path, client: Any = None, *,
                        allow_dev_attestation: bool | str | Iterable[str] = False,
                        tee_kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Deploy every function in an app file with its code sealed; release the key to the attested replicas."""
    from cocoon_faas.bundle import bundle, load_app

    s = get_settings()
    home = s.home
    c = client.transport if client is not None else Transport(s.gateway_url, s.api_key or _local_key(home))
    _, functions = load_app(path)
    out = []
    for fn in functions:
        b = bundle(fn)
        policy = build_policy(home, c.url, fn.name, measurement=b.measurement,
                              allow_dev_attestation=allow_dev_attestation)
        if tee_kinds is not None:
            policy = ClientPolicy.build([b.measurement], allow_dev_keys=policy.trusted_dev_keys,
                                        tee_kinds=tee_kinds, function=fn.name)
        sealed, key = seal_code(b.blob, fn.name, b.measurement, policy)
        _save_code_key(home, fn.name, b.measurement, key, sealed)
        item = {**b.to_json(), "code": base64.b64encode(sealed).decode(), "meta": {"confidential": True}}
        rec = c.request("POST", "/v1/deployments", json={"functions": [item]}).json()["functions"][0]
        record_deployment(home, c.url, rec, confidential=True)
        rec["key_release"] = release_code_keys(c, fn.name, b.measurement, home)
        out.append(rec)
    return out
