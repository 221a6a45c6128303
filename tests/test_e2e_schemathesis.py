"""Property-based fuzzing of every route in the gateway's /openapi.json (schemathesis strategies driven by
hypothesis), with and without an API key, against the shared real gateway: no answer is a 5xx other than a
function's own `function_error`, and every error has the one JSON shape. Examples per operation are bounded so the
run stays short."""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import GatewayProc

pytestmark = pytest.mark.e2e

# functions that sleep or crash on purpose (tests/apps/edge.py, examples/hello.py): fuzzing them only waits
SLOW = re.compile(r"^/fn/(busy|sleepy|too_slow|scalable|slow_stream|countdown|crash_once|lone|secretive|stubborn\w*)$")
# with the key these change the gateway's own state (deploy bundles, delete functions, approve wallets): fuzzed
# without credentials only, so the shared gateway keeps serving the other tests
STATEFUL = {("POST", "/v1/deployments"), ("DELETE", "/v1/functions/{name}"), ("POST", "/v1/providers/approvals")}
EXAMPLES = 4


def _problem(response: Any) -> str | None:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    where = f"{response.request.method} {response.request.url} -> {status}: {response.text[:300]}"
    if status >= 500 and not (isinstance(body, dict) and body.get("error", {}).get("type") in
                              ("function_error", "no_capacity", "timeout", "replica_lost")):
        return "server error " + where
    if status >= 400 and not (isinstance(body, dict) and "error" in body):
        return "error without the JSON shape " + where
    return None


def _fuzzer(op: Any, identities: list[Any], url: str, problems: list[str], calls: list[int]) -> Any:
    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        for headers in identities:
            p = _problem(case.call(base_url=url, headers=headers, timeout=60))
            calls[0] += 1
            if p is not None and len(problems) < 20:
                problems.append(p)

    return fuzz


def test_every_route_answers_bad_input_with_4xx(gateway: GatewayProc) -> None:
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    problems: list[str] = []
    operations = 0
    calls = [0]
    for result in schema.get_all_operations():
        op = result.ok()
        if SLOW.match(op.path):
            continue
        operations += 1
        identities = [None, gateway.headers()] if (op.method.upper(), op.path) not in STATEFUL else [None]
        _fuzzer(op, identities, gateway.url, problems, calls)()
    assert operations >= 20 and calls[0] >= 2 * operations  # every route and deployed function was fuzzed
    assert problems == []
