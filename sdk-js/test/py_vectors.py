"""The Python side of the JS SDK's known-answer tests (sdk-js/test/*.test.ts run it; one JSON request
per line on stdin, one answer per line on stdout).

Nothing here is a recorded answer: each command computes its output with cocoon_faas at test time, so the JS
side is checked against the Python implementation as it is now, both ways.

    replica   {seed, function, measurement, now, gpu, gpu_flip} -> the replica's dev document and dev key
    seal      {seed, args, function, document, now_ms}        -> Python's seal_request body under the shared rng
    answer    {seed, function, measurement, now, body, mode}  -> the replica opens a JS-sealed body and answers
    receipt   {receipt, public_key}                           -> does Python accept this (JS-signed) receipt?
    payment   {seed, channel_id, seqno, sent, cp_seqno, cp_sent} -> Python's BOC and signed hash of that state
    init_sig  {seed, channel_id, balance_a}                   -> Python's InitChannel signature
    payment_check {boc, public_key}                           -> Python's parse of a JS-built state
    quote     {path, at, tamper}                              -> Python's verify_quote outcome for a testdata quote
    kit       {revoke, edits, report_data}                    -> dcapqvl_v4 and its collateral under a test root
    collateral {quote|path, collateral, at, root, accept_tcb} -> Python's verify_quote outcome with collateral
    gpu       {report, chain, at, expected_nonce}             -> Python's verify_gpu_report outcome (and parse)
    tdx_document {seed, function, measurement, now, gpu, revoke} -> a tdx document (quote from `kit`), collateral
    document_check {document, measurement, now, collateral, root, require_gpu, allow_debug} -> verify_document
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cocoon_faas.confidential import CheckFailed, ClientPolicy, EnvelopeError, seal_request, verify_document
from cocoon_faas.confidential.collateral import Collateral
from cocoon_faas.confidential.document import document_binding, tdx_evidence
from cocoon_faas.confidential.envelope import Receipt
from cocoon_faas.confidential.nvidia import verify_gpu_report
from cocoon_faas.confidential.replica import ReplicaIdentity
from cocoon_faas.confidential.tdx import DEFAULT_ACCEPTED_TCB, TdxPolicy, verify_quote
from cocoon_faas.ton.channel import SemiChannel, SemiChannelBody, SignedSemiChannel, StateTemplate
from cocoon_faas.ton.keys import PrivateKey, PublicKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from py_tdx_kit import resign  # noqa: E402  (a sibling test module, not a package)

TESTDATA = Path(os.environ.get("COCOON_TESTDATA") or Path(__file__).resolve().parents[2].parent / "shared" / "testdata")


def stream_rng(seed: str, label: str):  # type: ignore[no-untyped-def]
    """rand(n): successive bytes of SHA-256(seed ‖ label ‖ u32 counter) blocks (the JS tests use the same)."""
    buf = bytearray()
    counter = 0

    def rand(n: int) -> bytes:
        nonlocal counter
        while len(buf) < n:
            buf.extend(hashlib.sha256(f"{seed}/{label}".encode() + counter.to_bytes(4, "big")).digest())
            counter += 1
        out = bytes(buf[:n])
        del buf[:n]
        return out

    return rand


def gpu_evidence(flip: int | None = None) -> tuple[bytes, bytes]:
    """The shared Hopper report and chain; `flip`: a byte of the report flipped (a tampered report)."""
    nv = TESTDATA / "nvidia"
    report = bytearray.fromhex((nv / "hopperAttestationReport.txt").read_text().strip())
    if flip is not None:
        report[flip] ^= 0x40
    return bytes(report), (nv / "hopper_cert_chain_case1.txt").read_bytes()


def replica(d: dict[str, Any]) -> ReplicaIdentity:
    dev = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{d['seed']}/dev".encode()).digest())
    return ReplicaIdentity.create(d["function"], d["measurement"], "0.1.0", "dev", dev_key=dev, now=d["now"],
                                  rng=stream_rng(d["seed"], "replica"),
                                  gpu_evidence=gpu_evidence(d.get("gpu_flip")) if d.get("gpu") else None)


def cmd_replica(d: dict[str, Any]) -> dict[str, Any]:
    r = replica(d)
    return {"document": r.document, "dev_public_key": r.document["evidence"]["dev_public_key"]}


def cmd_seal(d: dict[str, Any]) -> dict[str, Any]:
    doc = d["document"]
    pol = ClientPolicy.build([doc["measurement"]], allow_dev_keys=[doc["evidence"]["dev_public_key"]])
    v = verify_document(doc, pol, now=doc["issued_at"])
    body, _ = seal_request(json.dumps(d["args"]).encode(), d["function"], [v], rng=stream_rng(d["seed"], "seal"),
                           now_ms=d["now_ms"])
    return {"body": bytes(body).hex()}


def cmd_answer(d: dict[str, Any]) -> dict[str, Any]:
    r = replica(d)
    try:
        opened = r.open_request(bytes.fromhex(d["body"]), now_ms=d["now"] * 1000)
    except (EnvelopeError, CheckFailed) as exc:
        return {"error": exc.check}
    args = json.loads(opened.args_json)
    ctx, mode = opened.ctx, d.get("mode", "unary")
    frames: list[bytes] = []
    if mode == "unary":
        frames.append(r.seal_response(ctx, "call-1", json.dumps({"echo": args}).encode(), 12.5, 4321))
    elif mode == "stream":
        for i, tok in enumerate(str(args.get("prompt", "")).split()):
            frames.append(r.seal_chunk(ctx, i, json.dumps(tok).encode()))
        frames.append(r.seal_end(ctx, "call-2", 7.0, 99))
    elif mode == "error":
        frames.append(r.seal_error(ctx, "call-3", "ValueError", "bad input: secret stays sealed", 1.0, 5))
    return {"args": args, "frames": [f.hex() for f in frames],
            "receipt_public_key": r.receipt_public_key.hex()}


def cmd_receipt(d: dict[str, Any]) -> dict[str, Any]:
    try:
        rec = Receipt.from_bytes(bytes.fromhex(d["receipt"]))
        rec.verify(bytes.fromhex(d["public_key"]))
    except EnvelopeError as exc:
        return {"ok": False, "check": exc.check}
    out = rec.to_dict()
    out["ok"] = True
    out["reencoded"] = rec.to_bytes().hex()
    return out


def cmd_payment(d: dict[str, Any]) -> dict[str, Any]:
    key = PrivateKey(hashlib.sha256(d["seed"].encode()).digest())
    cp = SemiChannelBody(int(d["cp_seqno"]), int(d["cp_sent"]))
    state = SemiChannel(int(d["channel_id"]), SemiChannelBody(int(d["seqno"]), int(d["sent"])), cp)
    signed = state.sign(key)
    boc_t, _ = StateTemplate(state.channel_id, cp).build(state.data.seqno, state.data.sent, key.sign)
    return {"secret_key": key.to_bytes().hex(), "boc": signed.to_boc().hex(), "template_boc": boc_t.hex(),
            "hash": state.to_cell().hash.hex()}


def cmd_init_sig(d: dict[str, Any]) -> dict[str, Any]:
    from cocoon_faas.ton.messages import InitChannel

    key = PrivateKey(hashlib.sha256(d["seed"].encode()).digest())
    m = InitChannel.signed(key, True, int(d["channel_id"]), int(d["balance_a"]), 0)
    return {"secret_key": key.to_bytes().hex(), "signature": m.signature.hex()}


def cmd_payment_check(d: dict[str, Any]) -> dict[str, Any]:
    s = SignedSemiChannel.from_boc(bytes.fromhex(d["boc"]))
    return {"channel_id": str(s.state.channel_id), "seqno": str(s.state.data.seqno), "sent": str(s.state.data.sent),
            "cp_seqno": str(s.state.counterparty.seqno if s.state.counterparty else -1),
            "signed_by": s.is_signed_by(PublicKey(bytes.fromhex(d["public_key"])))}


def cmd_quote(d: dict[str, Any]) -> dict[str, Any]:
    raw = bytearray((TESTDATA / "tdx" / d["path"]).read_bytes())
    if d.get("tamper") is not None:
        raw[int(d["tamper"])] ^= 1
    at = datetime.fromisoformat(d["at"]).replace(tzinfo=timezone.utc)
    try:
        v = verify_quote(bytes(raw), at=at)
    except CheckFailed as exc:
        return {"ok": False, "check": exc.check}
    rep = v.quote.report
    return {"ok": True, "quote": base64.b64encode(bytes(raw)).decode(), "mrtd": rep.mr_td.hex(),
            "report_data": rep.report_data.hex(), "debug": rep.debug, "rtmr0": rep.rtmr[0].hex(),
            "version": v.quote.header.version, "root_sha256": v.root_sha256}


def _at(d: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(d["at"]).replace(tzinfo=timezone.utc)


def _failed(exc: CheckFailed) -> dict[str, Any]:
    return {"ok": False, "check": exc.check}


def _kit(d: dict[str, Any], report_data: bytes | None = None) -> dict[str, Any]:
    k = resign(TESTDATA / "tdx", revoke_leaf=bool(d.get("revoke")), edits=d.get("edits"), report_data=report_data)
    return {"quote": base64.b64encode(k["quote"]).decode(), "collateral": k["collateral"], "root": k["root"].hex()}


def cmd_kit(d: dict[str, Any]) -> dict[str, Any]:
    return _kit(d)


def cmd_collateral(d: dict[str, Any]) -> dict[str, Any]:
    raw = base64.b64decode(d["quote"]) if d.get("quote") else (TESTDATA / "tdx" / d["path"]).read_bytes()
    root = x509.load_der_x509_certificate(bytes.fromhex(d["root"])) if d.get("root") else None
    try:
        v = verify_quote(raw, at=_at(d), root=root, collateral=Collateral.from_json(d["collateral"]),
                         accept_tcb=d.get("accept_tcb") or DEFAULT_ACCEPTED_TCB)
    except CheckFailed as exc:
        return _failed(exc)
    assert v.tcb is not None
    return {"ok": True, "tcb": v.tcb.to_dict(), "mrtd": v.quote.report.mr_td.hex()}


def cmd_gpu(d: dict[str, Any]) -> dict[str, Any]:
    nonce = bytes.fromhex(d["expected_nonce"]) if d.get("expected_nonce") else None
    try:
        v = verify_gpu_report(bytes.fromhex(d["report"]), d["chain"].encode(), at=_at(d), expected_nonce=nonce)
    except CheckFailed as exc:
        return _failed(exc)
    rep = v.report
    return {"ok": True, "leaf_subject": v.leaf_subject, "request_nonce": rep.request_nonce.hex(),
            "measurements": {str(k): m.hex() for k, m in rep.measurements.items()}, "config": rep.config()}


def cmd_tdx_document(d: dict[str, Any]) -> dict[str, Any]:
    doc = replica(d).document
    body = {k: v for k, v in doc.items() if k != "evidence"}
    body["tee"] = "tdx"
    kit = _kit(d, report_data=document_binding(body))
    gpu = gpu_evidence() if d.get("gpu") else (None, None)
    ev = tdx_evidence(base64.b64decode(kit["quote"]), gpu[0], gpu[1])
    return {"document": {**body, "evidence": ev}, "collateral": kit["collateral"], "root": kit["root"]}


def cmd_document_check(d: dict[str, Any]) -> dict[str, Any]:
    root = x509.load_der_x509_certificate(bytes.fromhex(d["root"])) if d.get("root") else None
    col = Collateral.from_json(d["collateral"]) if d.get("collateral") else None
    pol = ClientPolicy.build([d["measurement"]], allow_dev_keys=d.get("dev_keys", []), root=root, collateral=col,
                             require_gpu=bool(d.get("require_gpu")),
                             tdx=TdxPolicy.build(allow_debug=bool(d.get("allow_debug")),
                                                 require_collateral=bool(d.get("require_collateral"))))
    try:
        v = verify_document(d["document"], pol, d["now"])
    except CheckFailed as exc:
        return _failed(exc)
    tcb = v.quote.tcb.to_dict() if v.quote is not None and v.quote.tcb is not None else None
    return {"ok": True, "key_id": v.key_id, "tee": v.tee, "tcb": tcb}


def main() -> None:
    """One JSON request per line in, one JSON answer per line out (one process serves a whole test file)."""
    cmds = {n[4:]: f for n, f in globals().items() if n.startswith("cmd_")}
    for line in sys.stdin:
        d = json.loads(line)
        sys.stdout.write(json.dumps(cmds[d.pop("cmd")](d)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
