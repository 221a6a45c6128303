"""`cocoon wallet create|faucet|show` on the local chain (channel commands need a gateway: see test_payments_routes)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from cocoon_faas.cli.pay import register
from cocoon_faas.settings import reload_settings


def test_wallet_commands(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COCOON_HOME", str(tmp_path))
    reload_settings()

    @click.group()
    def main() -> None:
        pass

    register(main)
    r = CliRunner()
    assert r.invoke(main, ["wallet", "show"]).exit_code == 1
    created = json.loads(r.invoke(main, ["wallet", "create"]).output)
    assert len(created["mnemonic"].split()) == 24
    assert r.invoke(main, ["wallet", "create"]).exit_code == 1
    assert json.loads(r.invoke(main, ["wallet", "faucet", "2.5"]).output)["balance_ton"] == "2.5"
    shown = json.loads(r.invoke(main, ["wallet", "show"]).output)
    assert shown["address"] == created["address"] and shown["balance_ton"] == "2.5"
    assert r.invoke(main, ["wallet", "faucet", "0.0000000001"]).exit_code == 1
    monkeypatch.undo()  # back to the test session's own home before the settings are read again
    reload_settings()
