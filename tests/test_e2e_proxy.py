"""`cocoon proxy` end to end: the official `openai` client, pointed at the proxy, gets sealed and paid inference from
a real gateway. The caller has its own COCOON_HOME, no API key, a channel opened with the CLI, and trusts this
machine's dev attestation key. A marker in every prompt never reaches the gateway's log, database or forwarded
bytes; each per-token charge equals usage x price + fee, and the ledger verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from cocoon_faas.confidential.document import DEV_KEY_FILE
from tests.conftest import ROOT, GatewayProc, free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

MARKER = "proxymarker" + os.urandom(5).hex()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("proxygw") / "home"
    g = GatewayProc(home, env={"COCOON_ATTESTATION": "dev", "COCOON_CAPTURE_FORWARDED": str(home / "fwd.bin")})
    g.start()
    g.cli("deploy", str(ROOT / "tests" / "apps" / "tiny_llm.py"))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def proxy(gw: GatewayProc, tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("proxycaller") / "home"
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(COCOON_HOME=str(home), COCOON_GATEWAY_URL=gw.url, COCOON_CHAIN_PATH=str(gw.home / "chain.db"),
               PYTHONUNBUFFERED="1")

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cli("wallet", "create")
    cli("wallet", "faucet", "10")
    cli("channel", "open", "--deposit", "5")
    shutil.copy(gw.home / DEV_KEY_FILE, home / DEV_KEY_FILE)  # one machine: its dev key (NOT SECURE) is trusted
    port = free_port()
    log = open(home / "proxy.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "cocoon_faas", "proxy", "--port", str(port),
                          "--allow-dev-attestation"], env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    assert not (home / "api_key").exists()
    yield {"url": url, "home": home, "client": openai.OpenAI(base_url=url + "/v1", api_key="unused",
                                                               max_retries=0, timeout=60)}
    p.terminate()
    p.wait(20)


def _ledger_charge(gw: GatewayProc, call_id: str) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/v1/ledger/calls/{call_id}", headers=gw.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _per_token(prompt: int, completion: int) -> int:
    compute = -(-(prompt * 3 * 10**9 + completion * 9 * 10**9) // 10**6)  # 3 / 9 TON per million tokens
    return compute + -(-compute * 500 // 10_000)  # no royalty; the 5% operator fee


def test_chat_stream_with_usage_is_sealed_paid_and_charged_per_token(gw: GatewayProc, proxy: Any) -> None:
    oa = proxy["client"]
    stream = oa.chat.completions.create(model="tiny-echo", stream=True, stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": f"hello {MARKER} world"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"HELLO {MARKER.upper()} WORLD "
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 3 and usage.prompt_tokens == 4
    cocoon = chunks[-1].model_extra["cocoon"]
    assert cocoon["receipt_checked"] is True and cocoon["charge"] == _per_token(4, 3)
    booked = _ledger_charge(gw, cocoon["call_id"])
    assert booked["status"] == "charged" and booked["charged"] == cocoon["charge"]
    assert booked["provider_nanoton"] + booked["royalty_nanoton"] + booked["operator_nanoton"] == cocoon["charge"]


def test_an_option_the_function_does_not_take_is_refused_before_anything_is_paid(proxy: Any) -> None:
    # tiny_chat takes no n: the gateway's model list says so and the proxy refuses it (no call, no hold)
    with pytest.raises(openai.BadRequestError, match="does not support 'n'"):
        proxy["client"].chat.completions.create(model="tiny-echo", n=2, messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="cannot call tools"):  # nor response_format, which tools need
        proxy["client"].chat.completions.create(model="tiny-echo", messages=[{"role": "user", "content": "a"}],
                                                tools=[{"type": "function", "function": {"name": "f"}}])


def test_completions_and_embeddings(gw: GatewayProc, proxy: Any) -> None:
    oa = proxy["client"]
    c = oa.completions.create(model="tiny-echo", prompt=f"one two {MARKER}", max_tokens=2)
    assert c.choices[0].text == "ONE TWO " and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 2
    assert c.model_extra["cocoon"]["charge"] == _per_token(c.usage.prompt_tokens, 2)
    e = oa.embeddings.create(model="tiny-emb", input=[f"a {MARKER}", "bb"])
    assert [d.embedding[0] for d in e.data] == [float(len(f"a {MARKER}")), 2.0]
    assert e.model_extra["cocoon"]["charge"] > 0


def test_the_gateway_saw_no_plaintext_and_the_ledger_verifies(gw: GatewayProc, proxy: Any) -> None:
    held = {str(p.relative_to(gw.home)): p.read_bytes() for p in gw.home.rglob("*") if p.is_file()}
    assert any(k.startswith("fwd.bin") for k in held) and len(held["fwd.bin"]) > 1000  # it did forward calls
    for name, data in held.items():
        assert MARKER.encode() not in data and MARKER.upper().encode() not in data, name
    log = (proxy["home"] / "proxy.log").read_text()
    assert "Traceback" not in log, log
    v = httpx.get(gw.url + "/v1/ledger?verify=1", headers=gw.headers(), timeout=30).json()
    assert v["verify"]["ok"] and v["verify"]["charges"] >= 4
    ch = json.loads((proxy["home"] / "channel.json").read_text())["channel_id"]
    s = httpx.get(f"{gw.url}/v1/channels/{ch}", timeout=30).json()
    assert s["reserved"] == 0 and s["charged"] > 0
