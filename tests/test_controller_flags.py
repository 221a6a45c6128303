"""Deployment flags are typed, and they reach placement: a confidential deployment runs only on attested provider
nodes (`Requirements.from_spec` used to read a `confidential` attribute no spec has, so the exclusion never fired)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.gateway.controller import Controller, DeploymentFlags, FunctionRuntime
from cocoon_faas.gateway.marketplace import Marketplace, Requirements
from cocoon_faas.settings import Settings
from cocoon_faas.signature import Signature
from cocoon_faas.spec import make_spec
from tests.test_marketplace import Clock, node


def _fr(confidential: bool) -> FunctionRuntime:
    def f() -> int:
        return 0

    return FunctionRuntime("f", "dev", 1, make_spec(name="f", gpu="H100"), Signature.of(f), "00" * 32, b"",
                           DeploymentFlags(confidential=confidential))


def _controller(tmp: Any, market: Marketplace) -> Controller:
    c = Controller(None, Settings(home=tmp), backend=None)  # type: ignore[arg-type]  # placement needs neither
    c.market = market
    return c


def test_confidential_deployments_are_placed_only_on_attested_nodes(tmp_path: Any) -> None:
    market = Marketplace(heartbeat_interval=1.0, clock=Clock(), rng=random.Random(7))
    market.register(node("cheap", "H100", price=100))
    market.register(node("attested", "H100", price=900))
    market.set_attestation("cheap", False)
    ctrl = _controller(tmp_path, market)
    assert ctrl._place(_fr(confidential=False))[0] == "cheap"
    assert ctrl._place(_fr(confidential=True))[0] == "attested"
    assert Requirements.from_spec(_fr(True).spec, confidential=True).confidential
    assert not Requirements.from_spec(_fr(True).spec).confidential  # a spec alone says nothing about it


def test_deployment_flags_parse_strictly() -> None:
    assert DeploymentFlags.from_json(None) == DeploymentFlags() == DeploymentFlags.from_json({})
    assert DeploymentFlags.from_json({"confidential": True}).confidential
    assert DeploymentFlags.from_json({"confidential": True}).to_json() == {"confidential": True}
    for bad in ([], {"confidential": "yes"}, {"sealed": True}):
        with pytest.raises(InvalidRequestError):
            DeploymentFlags.from_json(bad)
