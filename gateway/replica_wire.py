"""Everything a replica sends the gateway, parsed here: strict, bounded decoders into typed values.

A replica runs on a provider's node, and the provider controls that process, so nothing it sends is trusted:
not its start-up facts (written as bytes to Ray's key-value store) and not the meta of its frames. The gateway
never unpickles what a replica produced; it reads bytes and decodes them here:

* JSON only, with a size limit, a nesting limit, and no NaN or infinity (`parse_constant` refuses them);
* every known field checked for type and range (durations finite and not negative, ports in range, strings
  bounded, hex where hex is meant); unknown fields are ignored, so replicas of a newer runtime still work;
* a wrong type raises `ReplicaProtocolError`; the caller drops the replica (it is replaced) rather than guess.

Frame meta decoded here is still handed on as a small dict (the call path reads `ms`, `logs`, `type`, ...), but
only with the keys listed below, each of the checked type: a replica cannot add keys the gateway would act on.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.replica_context import LoadReport

MAX_FACTS = 1024 * 1024
MAX_DEPTH = 32
MAX_LOG_LINES = P.MAX_LOG_LINES
MAX_LOG_CHARS = 256 * 1024
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_NAME = P.NAME
LOG_STREAMS = ("stdout", "stderr", "error")
# What a replica may send the gateway; anything else (a CREDIT, a CALL, ...) is refused before its meta is read.
REPLICA_SENDS = frozenset((P.RESULT, P.ERROR, P.CHUNK, P.END, P.PONG, P.HELLO, P.STATS))


class ReplicaProtocolError(ValueError):
    """Raised when a replica sends bytes the gateway refuses (malformed, oversized, wrongly typed)."""


def _refuse_constant(name: str) -> Any:
    raise ReplicaProtocolError(f"{name} is not allowed in replica JSON")


def _depth(value: Any, limit: int = MAX_DEPTH) -> None:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            raise ReplicaProtocolError(f"JSON nested deeper than {limit}")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def load_json(raw: bytes, limit: int) -> Any:
    """Bounded JSON: at most `limit` bytes, nesting at most MAX_DEPTH, no NaN/Infinity."""
    if len(raw) > limit:
        raise ReplicaProtocolError(f"{len(raw)} bytes of JSON, more than the {limit} allowed")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ReplicaProtocolError(f"JSON nested deeper than {MAX_DEPTH}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReplicaProtocolError(f"not JSON: {exc}") from None
    _depth(value)
    return value


# -- field checks -----------------------------------------------------------------------------------------------
def _str(d: dict[str, Any], key: str, limit: int, default: str | None = None, pattern: re.Pattern[str] | None = None
         ) -> str | None:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str) or len(v) > limit or (pattern is not None and not pattern.match(v)):
        raise ReplicaProtocolError(f"field {key!r} must be a string of at most {limit} characters")
    return v


def _num(d: dict[str, Any], key: str, lo: float = 0.0, hi: float = 1e12) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ReplicaProtocolError(f"field {key!r} must be a finite number between {lo:g} and {hi:g}, got {v!r}")
    return float(v)


def _int(d: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ReplicaProtocolError(f"field {key!r} must be an integer between {lo} and {hi}, got {v!r}")
    return v


def _bool(d: dict[str, Any], key: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise ReplicaProtocolError(f"field {key!r} must be true or false")
    return v


def decode_logs(value: Any) -> list[tuple[str, str]]:
    """[[stream, text], ...] with a known stream name, bounded in lines and characters."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LOG_LINES:
        raise ReplicaProtocolError(f"logs must be a list of at most {MAX_LOG_LINES} [stream, text] pairs")
    out: list[tuple[str, str]] = []
    total = 0
    for item in value:
        if (not isinstance(item, list) or len(item) != 2 or item[0] not in LOG_STREAMS
                or not isinstance(item[1], str)):
            raise ReplicaProtocolError(f"each log line must be [stream, text] with stream one of {LOG_STREAMS}")
        total += len(item[1])
        if total > MAX_LOG_CHARS:
            raise ReplicaProtocolError(f"logs exceed {MAX_LOG_CHARS} characters")
        out.append((item[0], item[1]))
    return out


def decode_usage(value: Any) -> dict[str, int]:
    """{"prompt_tokens", "completion_tokens", "cached_tokens"?}: counts, each a non-negative integer."""
    if not isinstance(value, dict):
        raise ReplicaProtocolError("usage must be an object of token counts")
    out: dict[str, int] = {}
    for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        n = _int(value, key, 0, 10**9)
        if n is not None:
            out[key] = n
    return out


def decode_load(value: Any) -> LoadReport:
    """An engine's load report (a STATS frame): each field a non-negative integer, or the frame is refused. The
    numbers are then clamped (counts to MAX_COUNT, `kv_used` to `kv_blocks`, `running` to `max_seqs`): they only
    steer the autoscaler and the chooser for this replica's own function, so a lying replica can at worst mis-scale
    it (within its max_replicas) or turn its callers away to other replicas (docs/security.md)."""
    if not isinstance(value, dict):
        raise ReplicaProtocolError("a load report must be an object of counts")
    keys = ("waiting", "running", "max_seqs", "kv_blocks", "kv_used", "max_waiting")
    return LoadReport.clamped({key: _int(value, key, 0, 2**63) or 0 for key in keys})


# -- frame meta -------------------------------------------------------------------------------------------------
def decode_meta(ftype: int, raw: bytes) -> dict[str, Any]:
    """The meta of one frame from a replica, reduced to the checked keys the gateway reads."""
    if ftype not in REPLICA_SENDS:
        raise ReplicaProtocolError(f"frame type {P.TYPE_NAMES.get(ftype, ftype)} is not one a replica sends")
    if len(raw) <= 2:
        if raw not in (b"", b"{}"):
            raise ReplicaProtocolError("meta must be a JSON object")
        return {}
    m = load_json(raw, P.MAX_META)
    if not isinstance(m, dict):
        raise ReplicaProtocolError("meta must be a JSON object")
    out: dict[str, Any] = {}
    ms = _num(m, "ms", 0.0, 1e10)
    if ms is not None:
        out["ms"] = ms
    if "logs" in m:
        logs = decode_logs(m["logs"])
        if logs:
            out["logs"] = logs
    if ftype in (P.CHUNK, P.END):
        seq = _int(m, "seq", 0)
        if seq is not None:
            out["seq"] = seq
    if ftype in (P.RESULT, P.CHUNK, P.END):
        sealed = _str(m, "sealed", 16, pattern=re.compile(r"^(res|err|end|chunk)$"))
        if sealed is not None:
            out["sealed"] = sealed
        gm = _str(m, "gm", 128, pattern=_HEX)
        if gm is not None:
            out["gm"] = gm
    if ftype in (P.RESULT, P.END) and "usage" in m:  # token counts of a sealed per-token priced call
        out["usage"] = decode_usage(m["usage"])
    if ftype == P.RESULT and "ok" in m:  # answers to UNLOCK
        out["ok"] = _bool(m, "ok")
        for key in ("check", "message"):
            v = _str(m, key, 2000 if key == "message" else 64)
            if v is not None:
                out[key] = v
    if ftype == P.ERROR:
        out["type"] = _str(m, "type", 64, "replica_error", pattern=_NAME)
        out["message"] = _str(m, "message", 4000, "")
        for key, limit in (("exc_type", 200), ("check", 64)):
            v = _str(m, key, limit, pattern=_NAME)
            if v is not None:
                out[key] = v
        status = _int(m, "status", 400, 599)
        if status is not None:
            out["status"] = status
    if ftype == P.HELLO and "direct" in m:  # the sandbox answered: this connection is the direct path
        out["direct"] = _bool(m, "direct")
    if ftype == P.PONG:
        out["inflight"] = _int(m, "inflight", 0, 10**9) or 0
    if ftype == P.STATS:
        out["load"] = decode_load(m)
    return out


# -- start-up facts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaFacts:
    """What a replica reports once started (or why it could not start)."""

    ok: bool
    host: str = ""
    port: int = 0
    pid: int = 0
    setup_s: float = 0.0
    runtime: str = ""
    code_locked: bool = False
    sandboxed: bool = False
    key_id: str | None = None
    document: dict[str, Any] | None = None
    attestation_error: str | None = None
    logs: tuple[tuple[str, str], ...] = ()
    error_type: str = ""
    message: str = ""
    traceback: str = ""

    def public(self) -> dict[str, Any]:
        """The facts the gateway keeps about a started replica (`ReplicaHandle.extra`)."""
        out: dict[str, Any] = {"pid": self.pid, "setup_s": self.setup_s, "sandboxed": self.sandboxed,
                               "code_locked": self.code_locked}
        if self.key_id is not None:
            out["key_id"] = self.key_id
        if self.document is not None:
            out["document"] = self.document
        return out


def decode_facts(raw: bytes) -> ReplicaFacts:
    """Start-up facts, as the replica wrote them to the key-value store."""
    d = load_json(raw, MAX_FACTS)
    if not isinstance(d, dict):
        raise ReplicaProtocolError("start-up facts must be a JSON object")
    logs = tuple(decode_logs(d.get("logs")))
    if not _bool(d, "ok"):
        return ReplicaFacts(
            ok=False, error_type=_str(d, "error_type", 200, "Error") or "Error",
            message=_str(d, "message", 4000, "") or "", traceback=_str(d, "traceback", 64 * 1024, "") or "",
            logs=logs)
    host = _str(d, "host", 64) or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ReplicaProtocolError(f"host must be an IP address, got {host!r}") from None
    port = _int(d, "port", 1, 65535)
    if port is None:
        raise ReplicaProtocolError("start-up facts name no port")
    document = d.get("document")
    if document is not None and not isinstance(document, dict):
        raise ReplicaProtocolError("document must be a JSON object")
    if isinstance(document, dict):
        for key in ("key_id", "hpke_public_key", "receipt_public_key"):
            _str(document, key, 256, pattern=_HEX)
    return ReplicaFacts(
        ok=True, host=host, port=port, pid=_int(d, "pid", 0, 2**31) or 0, setup_s=_num(d, "setup_s", 0, 1e6) or 0.0,
        runtime=_str(d, "runtime", 64, "") or "", code_locked=_bool(d, "code_locked"),
        sandboxed=_bool(d, "sandboxed"), key_id=_str(d, "key_id", 256, pattern=_HEX), document=document,
        attestation_error=_str(d, "attestation_error", 2000), logs=logs)


__all__ = ["REPLICA_SENDS", "ReplicaFacts", "ReplicaProtocolError", "decode_facts", "decode_load", "decode_logs",
           "decode_meta", "load_json"]
