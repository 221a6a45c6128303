"""`cocoon attest verify QUOTE`: verify a TDX quote offline and print its fields as JSON.

A thin layer over `cocoon_faas.confidential.tdx.verify_quote` and `check_policy`. Exit 0 when every check passes;
exit 1 with `"verified": false` and the failed check's name otherwise; exit 2 for usage errors.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click


def _parse_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ISO-8601; write e.g. 2025-06-20T00:00:00Z",
                                 param_hint="--at") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def verify_quote_file(quote: Path, *, collateral: Path | None = None, at: datetime | None = None,
                      root: Path | None = None, allow_debug: bool = False, mrtd: tuple[str, ...] = (),
                      report_data: str | None = None, accept_tcb: tuple[str, ...] = ()) -> dict[str, Any]:
    """Verify a quote file and return the JSON-able result; never raises for a failed check."""
    from cocoon_faas.confidential.collateral import Collateral
    from cocoon_faas.confidential.errors import CheckFailed
    from cocoon_faas.confidential.quote import parse_quote
    from cocoon_faas.confidential.tdx import DEFAULT_ACCEPTED_TCB, TdxPolicy, check_policy, verify_quote
    from cocoon_faas.confidential.x509chain import load_cert

    out: dict[str, Any] = {"file": str(quote)}
    try:
        raw = quote.read_bytes()
        q = parse_quote(raw)
        out.update({"version": q.header.version, **q.report.to_dict(), "quote_length": q.length,
                    "trailing_bytes": len(raw) - q.length})
        col = Collateral.from_json(collateral.read_text()) if collateral else None
        root_cert = load_cert(root) if root else None
        v = verify_quote(q, at=at, root=root_cert, collateral=col,
                         accept_tcb=set(accept_tcb) | DEFAULT_ACCEPTED_TCB)
        out.update(v.to_dict())
        policy = TdxPolicy.build(mrtd=mrtd or None, allow_debug=allow_debug)
        check_policy(v, policy, bytes.fromhex(report_data) if report_data else None)
        out["verified"] = True
    except CheckFailed as exc:
        out.update({"verified": False, "failed_check": exc.check, "error": exc.message})
    return out


def register(main: click.Group) -> None:
    @main.group("attest")
    def attest() -> None:
        """Verify TEE attestation evidence (TDX quotes) offline."""

    @attest.command("verify")
    @click.argument("quote", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--collateral", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="DCAP collateral JSON (dcap-qvl/PCCS form): adds revocation, QE identity, TCB status")
    @click.option("--at", "at_", metavar="ISO-8601", help="evaluation time (default: now)")
    @click.option("--root", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="trust this root CA (DER or PEM) instead of the pinned Intel SGX Root CA")
    @click.option("--allow-debug", is_flag=True, help="accept a DEBUG TD (never in production)")
    @click.option("--mrtd", multiple=True, metavar="HEX", help="allowed MRTD (repeatable)")
    @click.option("--report-data", metavar="HEX", help="required REPORTDATA (64 bytes hex)")
    @click.option("--accept-tcb", multiple=True, metavar="STATUS", help="also accept this TCB status")
    def verify(quote: Path, collateral: Path | None, at_: str | None, root: Path | None, allow_debug: bool,
               mrtd: tuple[str, ...], report_data: str | None, accept_tcb: tuple[str, ...]) -> None:
        """Verify QUOTE (a TDX v4/v5 quote file) and print its fields as JSON."""
        result = verify_quote_file(quote, collateral=collateral, at=_parse_at(at_), root=root,
                                   allow_debug=allow_debug, mrtd=mrtd, report_data=report_data,
                                   accept_tcb=accept_tcb)
        click.echo(json.dumps(result, indent=2))
        if not result["verified"]:
            click.echo(f"error: attestation check failed, {result['error']}", err=True)
            sys.exit(1)

    @attest.command("document")
    @click.argument("document", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--measurement", multiple=True, metavar="HEX", help="allowed measurement (default: any)")
    @click.option("--allow-dev-key", multiple=True, metavar="HEX", help="trust this dev attestation key")
    @click.option("--at", "at_", metavar="ISO-8601", help="evaluation time (default: now)")
    def document(document: Path, measurement: tuple[str, ...], allow_dev_key: tuple[str, ...],
                 at_: str | None) -> None:
        """Verify a replica's attestation DOCUMENT (JSON) and print what it binds."""
        from cocoon_faas.confidential.document import INSECURE_WARNING, ClientPolicy, verify_document
        from cocoon_faas.confidential.errors import CheckFailed

        policy = ClientPolicy.build(measurement or None, allow_dev_keys=allow_dev_key)
        raw = document.read_bytes()
        try:
            v = verify_document(raw, policy, _parse_at(at_))
        except CheckFailed as exc:
            click.echo(json.dumps({"verified": False, "failed_check": exc.check, "error": exc.message}, indent=2))
            if '"kind":"dev"' in raw.decode(errors="replace").replace(" ", ""):
                click.echo(INSECURE_WARNING, err=True)
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)
        out = {"verified": True, "function": v.function, "measurement": v.measurement, "tee": v.tee,
               "key_id": v.key_id, "runtime_version": v.runtime_version, "expires_at": v.expires_at,
               "secure": not v.insecure}
        if v.insecure:
            out["warning"] = INSECURE_WARNING
            click.echo(INSECURE_WARNING, err=True)
        click.echo(json.dumps(out, indent=2))
