"""Telegram and the web, end to end on one real gateway (dev attestation, local chain): the JS SDK from Node, the
Mini App and the dashboard in a real headless Chromium (Debian's chromium + chromium-driver through selenium), and
the bot example against a local stand-in of the Bot API. Screenshots are taken on every run;
`COCOON_SCREENSHOTS=docs/screenshots` refreshes the committed ones the README shows. One gateway for the whole module keeps this within CI's budget.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, GatewayProc, free_port
from tests.ray_nodes import wait_for

pytestmark = pytest.mark.e2e

SDK_DIST = ROOT / "sdk-js" / "dist"
# screenshots: to a temporary folder, or where COCOON_SCREENSHOTS says (docs/screenshots refreshes the committed ones)
SHOTS = Path(os.environ.get("COCOON_SCREENSHOTS") or Path(tempfile.gettempdir()) / "cocoon-web-screenshots")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BOT_TOKEN = "123456:TEST-token-for-the-local-stand-in"
MARKER = "plaintext-marker-7f3a"


def _dev_key(gw: GatewayProc) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = (gw.home / "dev_attestation_key").read_bytes()
    return Ed25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw().hex()


def _ledger(gw: GatewayProc) -> dict[str, Any]:
    r = httpx.get(gw.url + "/v1/ledger?verify=1", headers=gw.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


class Caller:
    """A paying caller with its own COCOON_HOME on the gateway's local chain (the CLI opens its channel)."""

    def __init__(self, home: Path, gw: GatewayProc) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
        self.env.update(COCOON_HOME=str(home), COCOON_GATEWAY_URL=gw.url, COCOON_CHAIN_PATH=str(gw.home / "chain.db"))
        for args in (("wallet", "create"), ("wallet", "faucet", "3"), ("channel", "open", "--deposit", "2")):
            r = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=self.env, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        from cocoon_faas.ton.keys import PrivateKey

        self.channel = json.loads((home / "channel.json").read_text())
        self.seed = PrivateKey.from_mnemonic(json.loads((home / "wallet.json").read_text())["words"]).to_bytes()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    home = tmp_path_factory.mktemp("webgw") / "home"
    g = GatewayProc(home, env={"COCOON_ATTESTATION": "dev", "COCOON_QUEUE_LIMIT": "32",
                               "COCOON_CAPTURE_FORWARDED": str(home.parent / "gateway-capture.bin")}).start()
    g.cli("deploy", str(ROOT / "examples" / "hello.py"))
    g.cli("deploy", str(ROOT / "tests" / "apps" / "web_chat.py"))
    yield g
    g.stop()


def test_js_sdk_against_the_gateway(gw: GatewayProc, tmp_path: Path) -> None:
    """call, stream, spawn/poll/cancel, sealed calls verified in JS, refusals, and paid calls from a channel."""
    if not (SDK_DIST / "test" / "gateway.e2e.js").exists():
        pytest.skip("the JS SDK is not built (scripts/test builds it: cd sdk-js && npm ci && npm run build)")
    payer = Caller(tmp_path / "payer", gw)
    r = subprocess.run(["node", str(SDK_DIST / "test" / "gateway.e2e.js"), gw.url, gw.key, _dev_key(gw),
                        str(payer.channel["channel_id"]), payer.seed.hex(),
                        str(2 * 10**9 - int(payer.channel.get("closing", {}).get("fine", 0)))],  # spendable
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["call"] == {"message": "Hello, Ada!"}
    assert out["stream"] == [{"n": 2}, {"n": 1}, {"n": 0, "liftoff": True}]
    assert out["cancelled"] == "cancelled"
    assert out["spawned"] == 3.5
    assert out["sealed"]["result"] == {"message": "Hello, sealed-Ada."} and out["sealed"]["insecure"] is True
    assert out["sealed_stream"]["text"] == "You said: fed cba" and out["sealed_stream"]["frames"] == 6  # 4 words, usage, end
    assert out["spawned_sealed"] == {"result": {"message": "Hello, later."}, "call": True}
    assert out["wrong_measurement"] == "measurement"
    assert out["untrusted_dev"] == "tee_kind"
    paid = out["paid"]
    assert out["paid_call"] == {"message": "Hello, payer."} and paid["sealed_result"] == {"message": "Hello, paid-sealed."}
    assert paid["stream_items"] == 2 and int(paid["sealed_charge"]) > 0
    assert out["sealed_typo"].startswith("400 invalid_request:") and "did you mean 'name'" in out["sealed_typo"]
    assert out["sealed_generator"].startswith("400 invalid_request:") and "is a generator" in out["sealed_generator"]
    assert out["charged_after_refusal"] == paid["charged"]
    assert paid["seqno"] == "3" and out["tab2_refused"].startswith("409 "), out["tab2_refused"]
    tab2 = out["tab2"]  # the second tab resynced past the first one's states, then paid its call
    assert tab2["resynced"] == "3" and tab2["call"] == {"message": "Hello, tab 2."}
    summary = httpx.get(f"{gw.url}/v1/channels/{payer.channel['channel_id']}", timeout=30).json()
    assert str(summary["seqno"]) == tab2["seqno"] == "4"
    assert str(summary["charged"]) == tab2["charged"] and int(tab2["charged"]) > int(paid["charged"])
    assert _ledger(gw)["verify"]["ok"]
    fn = httpx.get(f"{gw.url}/v1/functions/greet", timeout=30)  # after sealed calls: no gateway secret in it
    assert fn.status_code == 200 and "receipt_mac" not in fn.text


# -- the browser -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium (the dashboard needs nothing more)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/system-deps installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def browser(chromium: Any) -> Any:
    """Chromium for the pages that load the JS SDK's bundle (the Mini App)."""
    if not (SDK_DIST / "cocoon-sdk.js").exists():
        pytest.skip("the JS SDK bundle is not built (cd sdk-js && npm ci && npm run build)")
    return chromium


def _wait(driver: Any, cond: Any, timeout: float = 90) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the dashboard re-renders its tables every poll: an element found a moment ago may be gone; look again
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(cond)


def _click(driver: Any, locator: tuple[str, str]) -> None:
    """Click what ``locator`` names, finding it again if a re-render replaced it between find and click."""
    _wait(driver, lambda d: d.find_element(*locator).click() or True)


def _shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / name))


class MiniApp:
    """examples/miniapp/server.py as a subprocess on a free port."""

    def __init__(self, gw: GatewayProc, data: Path, **env: str) -> None:
        self.port, self.data = free_port(), data
        self.url = f"http://127.0.0.1:{self.port}"
        self.capture = data / "relayed.bin"
        data.mkdir(parents=True, exist_ok=True)
        e = {**os.environ, "MINIAPP_BOT_TOKEN": BOT_TOKEN, "COCOON_GATEWAY_URL": gw.url, "MINIAPP_DATA": str(data),
             "MINIAPP_TRUSTED_DEV_KEY": _dev_key(gw), "COCOON_CHAIN_PATH": str(gw.home / "chain.db"),
             "MINIAPP_CAPTURE": str(self.capture), **env}
        e.pop("COCOON_HOME", None)
        self.log = open(data / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "miniapp" / "server.py"), "--port",
                                      str(self.port)], env=e, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError((data / "server.log").read_text())

    def init_data(self, user_id: int, token: str = BOT_TOKEN, age_s: int = 0) -> str:
        sys.path.insert(0, str(ROOT / "examples" / "miniapp"))
        from initdata import sign_init_data

        user = json.dumps({"id": user_id, "first_name": "Ada", "username": "ada_tg"}, separators=(",", ":"))
        return sign_init_data({"auth_date": str(int(time.time()) - age_s), "query_id": "AAF", "user": user}, token)

    def open(self, driver: Any, init_data: str) -> None:
        from urllib.parse import quote

        # a fresh query each time: a change of fragment alone would not reload the page
        driver.get(f"{self.url}/?visit={time.monotonic_ns()}#tgWebAppData={quote(init_data)}&tgWebAppVersion=8.0")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def _ask(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, "prompt").is_enabled())
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_miniapp_sealed_paid_streamed_chat(gw: GatewayProc, browser: Any, tmp_path: Path) -> None:
    """Telegram initData checked by the backend; the prompt sealed in the browser to the attested replica; tokens
    stream in; the receipt verified in the page and the charge shown; neither the Mini App's server nor the gateway
    ever holds the prompt or the answer; the ledger verifies."""
    from selenium.webdriver.common.by import By

    app = MiniApp(gw, tmp_path / "miniapp")
    try:
        app.open(browser, app.init_data(4242))
        _ask(browser, f"hello {MARKER}")
        _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".msg.bot").get_attribute("data-done") == "1")
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.bot").text
        assert answer == f"You said: {MARKER[::-1]} olleh"
        charge = browser.find_element(By.ID, "charge").text
        assert int(charge.split()[0]) > 0
        assert "verified" in browser.find_element(By.ID, "receipt-ok").text
        assert browser.find_element(By.ID, "r-tee").text.startswith("dev — NOT SECURE")
        _shot(browser, "miniapp.png")
        relayed = app.capture.read_bytes()
        forwarded = Path(gw.env["COCOON_CAPTURE_FORWARDED"]).read_bytes()
        assert b"application/cocoon-sealed" not in relayed and len(relayed) > 500  # sealed bodies went through
        for secret in (MARKER.encode(), MARKER[::-1].encode()):
            assert secret not in relayed and secret not in forwarded
        rec = json.loads((app.data / "users" / "4242.json").read_text())
        summary = httpx.get(f"{gw.url}/v1/channels/{rec['channel_id']}", timeout=30).json()
        assert str(summary["charged"]) == charge.split()[0] and summary["seqno"] == 1
        # the channel's payer key is the one the page made and kept: the server never had it
        page_key = browser.execute_script("return localStorage.getItem('cocoon-key-4242')")
        assert len(page_key) == 64 and page_key.encode() not in (app.data / "server.log").read_bytes()
        from cocoon_faas.ton.keys import PrivateKey

        assert summary["key_a"] == rec["key_a"] == PrivateKey(bytes.fromhex(page_key)).public_key().hex()
        assert not list(app.data.rglob("*.key")) or all(p.name == "funding_wallet.key" for p in app.data.rglob("*.key"))
        assert _ledger(gw)["verify"]["ok"]
        _browser_verifies_tdx_quote(browser)
    finally:
        app.stop()


def _browser_verifies_tdx_quote(driver: Any) -> None:
    """The bundled SDK verifies a real TDX quote inside Chromium (WebCrypto, @peculiar/x509, the pinned Intel
    root) with the Python verifier's result, and refuses it once a signed byte changes."""
    import base64

    from tests.conftest import TESTDATA

    quote = Path(os.environ.get("COCOON_TESTDATA") or TESTDATA) / "tdx" / "trustee_v4.bin"
    if not quote.exists():
        return  # the shared vectors are absent (sdk-js/test/tdx.test.ts skips likewise; COCOON_TESTDATA points there)
    from datetime import datetime, timezone

    from cocoon_faas.confidential.tdx import verify_quote

    driver.set_script_timeout(60)
    want = verify_quote(quote.read_bytes(), at=datetime(2026, 6, 1, tzinfo=timezone.utc)).quote.report.mr_td.hex()
    got = driver.execute_async_script("""
        const [b64, done] = arguments;
        import("/sdk/cocoon-sdk.js").then(async (m) => {
          const raw = m.fromB64(b64), at = new Date("2026-06-01T00:00:00Z");
          const ok = await m.verifyQuote(raw, { at });
          raw[100] ^= 1;
          const bad = await m.verifyQuote(raw, { at }).then(() => "accepted", (e) => e.check);
          done({ mrtd: m.hex(ok.quote.report.mrTd), root: ok.rootSha256, tampered: bad });
        }, (e) => done({ error: String(e) }));
    """, base64.b64encode(quote.read_bytes()).decode())
    assert got == {"mrtd": want, "root": "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
                   "tampered": "quote_signature"}
    _browser_verifies_collateral_and_gpu(driver, quote.parent.parent)


def _browser_verifies_collateral_and_gpu(driver: Any, testdata: Path) -> None:
    """The bundle also checks TDX collateral (TCB status as Python gives it) and an NVIDIA GPU report inside
    Chromium, and refuses a flipped TCB-info signature byte and a flipped report signature byte."""
    import base64
    import json
    from datetime import datetime, timezone

    from cocoon_faas.confidential.collateral import Collateral
    from cocoon_faas.confidential.tdx import verify_quote

    quote, col = (testdata / "tdx" / "dcapqvl_v4.bin").read_bytes(), (testdata / "tdx" / "dcapqvl_v4_collateral.json")
    want = verify_quote(quote, at=datetime(2025, 6, 20, tzinfo=timezone.utc), collateral=Collateral.from_json(
        col.read_text())).tcb
    assert want is not None
    got = driver.execute_async_script("""
        const [q, col, rep, chain, done] = arguments;
        import("/sdk/cocoon-sdk.js").then(async (m) => {
          const at = new Date("2025-06-20T00:00:00Z"), gpuAt = new Date("2026-06-01T00:00:00Z");
          const v = await m.verifyQuote(m.fromB64(q), { at, collateral: m.parseCollateral(col) });
          const sig = col.tcb_info_signature, bad = { ...col, tcb_info_signature: (sig[0] === "0" ? "1" : "0") + sig.slice(1) };
          const tampered = await m.verifyQuote(m.fromB64(q), { at, collateral: m.parseCollateral(bad) })
            .then(() => "accepted", (e) => e.check);
          const g = await m.verifyGpuReport(m.fromHex(rep), chain, { at: gpuAt });
          const r2 = m.fromHex(rep); r2[r2.length - 5] ^= 0x40;
          const gpuTampered = await m.verifyGpuReport(r2, chain, { at: gpuAt }).then(() => "accepted", (e) => e.check);
          done({ status: v.tcb.status, fmspc: v.tcb.fmspc, tampered, gpu: /GH100/.test(g.leafSubject), gpuTampered });
        }, (e) => done({ error: String(e) }));
    """, base64.b64encode(quote).decode(), json.loads(col.read_text()),
        (testdata / "nvidia" / "hopperAttestationReport.txt").read_text().strip(),
        (testdata / "nvidia" / "hopper_cert_chain_case1.txt").read_text())
    assert got == {"status": want.status, "fmspc": want.fmspc, "tampered": "tcb_info", "gpu": True,
                   "gpuTampered": "gpu_signature"}


def test_miniapp_refuses_forged_initdata_and_tampered_attestation(gw: GatewayProc, browser: Any,
                                                                  tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    error = (By.ID, "error")
    app = MiniApp(gw, tmp_path / "honest")
    try:
        for init, reason in ((app.init_data(1, token="999:another-bot"), "forged"),
                             (app.init_data(1, age_s=7200), "stale"), ("", "missing")):
            app.open(browser, init)
            _wait(browser, lambda d: d.find_element(*error).is_displayed())
            assert browser.find_element(*error).get_attribute("data-check") == reason
            assert browser.find_element(By.ID, "prompt").is_enabled() is False
    finally:
        app.stop()
    bad = MiniApp(gw, tmp_path / "tampering", MINIAPP_TAMPER_ATTESTATION="1")
    try:
        bad.open(browser, bad.init_data(77))
        _ask(browser, f"do not send {MARKER}")
        _wait(browser, lambda d: d.find_element(*error).is_displayed())
        assert browser.find_element(*error).get_attribute("data-check") == "dev_signature"
        assert "refused to send" in browser.find_element(*error).text
        _shot(browser, "miniapp-tampered.png")
        assert not bad.capture.exists() or MARKER.encode() not in bad.capture.read_bytes()
        assert not bad.capture.exists() or b"request " not in bad.capture.read_bytes()  # nothing was sent
    finally:
        bad.stop()


DASH_APP = '''
import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=4, min_replicas=1, max_replicas=1)
def whoami() -> dict:
    return {"version": "VERSION"}
'''


def test_dashboard_login_chart_and_rollback(gw: GatewayProc, chromium: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser = chromium
    for v in ("one", "two"):
        (tmp_path / "dash_app.py").write_text(DASH_APP.replace("VERSION", v))
        gw.cli("deploy", str(tmp_path / "dash_app.py"))
    assert httpx.get(gw.url + "/dashboard/api/series", timeout=30).status_code == 401  # the data needs a key
    assert httpx.get(gw.url + "/dashboard/assets/..%2Fdashboard.py", timeout=30).status_code == 404
    page = httpx.get(gw.url + "/dashboard", timeout=30)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    with gw.http() as h:
        assert h.post("/fn/whoami", json={}).json() == {"version": "two"}
        browser.get(gw.url + "/dashboard")
        browser.find_element(By.ID, "key").send_keys("not-a-key")
        browser.find_element(By.ID, "login").click()
        _wait(browser, lambda d: "refused" in d.find_element(By.ID, "login-error").text)
        key = browser.find_element(By.ID, "key")
        key.clear()
        key.send_keys(gw.key)
        browser.find_element(By.ID, "login").click()
        row = (By.CSS_SELECTOR, 'tr.fn[data-name="whoami"]')
        _wait(browser, lambda d: d.find_elements(*row))
        names = {e.get_attribute("data-name") for e in browser.find_elements(By.CSS_SELECTOR, "tr.fn")}
        assert {"whoami", "greet", "Chat.generate"} <= names
        _click(browser, row)
        for _ in range(6):  # calls between the dashboard's samples, so the chart has a line
            for _ in range(5):
                h.post("/fn/whoami", json={})
            time.sleep(1.1)
        _wait(browser, lambda d: int(d.find_element(By.ID, "chart-latency").get_attribute("data-points") or 0) >= 3)
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-latency canvas")
        _wait(browser, lambda d: d.find_element(*row).find_elements(By.TAG_NAME, "td")[4].text not in ("0", "1"))
        _shot(browser, "dashboard.png")
        button = (By.CSS_SELECTOR, 'button.rollback[data-version="1"]')
        _click(browser, button)
        _wait(browser, lambda d: "rolled back" in d.find_element(By.ID, "rollback-result").text)
        assert h.post("/fn/whoami", json={}).json() == {"version": "one"}
        _shot(browser, "dashboard-rollback.png")
        # the operator's ledger (this key is the gateway's own) and the providers view
        browser.find_element(By.CSS_SELECTOR, 'button[data-tab="ledger"]').click()
        _wait(browser, lambda d: '"ok": true' in d.find_element(By.ID, "ledger-verify").text)
        assert "operator view" in browser.find_element(By.ID, "ledger-note").text
        _shot(browser, "dashboard-ledger.png")
        browser.find_element(By.CSS_SELECTOR, 'button[data-tab="providers"]').click()
        _wait(browser, lambda d: "updated" in d.find_element(By.ID, "updated").text
              and not d.find_element(By.ID, "tab-providers").get_attribute("hidden"))
        listed = h.get("/v1/providers").json()["providers"]
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#providers tbody tr")) == len(listed))


# -- the bot --------------------------------------------------------------------------------------------------

def _until(cond: Any, timeout: float = 90, what: str = "") -> Any:
    return wait_for(cond, timeout, what, step=0.1)


def test_telegram_bot_streams_pays_and_answers_errors_politely(gw: GatewayProc, tmp_path: Path) -> None:
    """examples/telegram_bot.py (python-telegram-bot) against a local Bot API stand-in set by its base URL: a
    message in, a paid streamed call, the answer edited in place; /summarize; an error answered politely; the
    bot's channel is charged and the ledger verifies."""
    pytest.importorskip("telegram", reason="python-telegram-bot not installed (scripts/test installs it)")
    from tests.botapi_standin import BotApiStandIn

    api = BotApiStandIn("42:bot-token", free_port()).start()
    payer = Caller(tmp_path / "bot", gw)
    env = {**payer.env, "TELEGRAM_BOT_TOKEN": "42:bot-token", "TELEGRAM_API_URL": api.url, "BOT_EDIT_EVERY_S": "0",
           "BOT_POLL_TIMEOUT_S": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "bot.log", "wb")
    bot = subprocess.Popen([sys.executable, str(ROOT / "examples" / "telegram_bot.py")], env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    chat = 5150
    try:
        api.user_says(chat, "hello marker")
        final = "You said: rekram olleh"
        sent = _until(lambda: [s for s in api.replies(chat) if s.edits and s.edits[-1] == final], what="the answer")[0]
        assert sent.text == "…" and len(sent.edits) >= 2  # streamed: the reply grew in place
        assert "sendChatAction" in api.methods()
        api.user_says(chat, "/summarize one two three")
        _until(lambda: any(s.text == "Summary (3 words): one two three" for s in api.replies(chat)), what="summary")
        api.user_says(chat, "fail: this one")
        polite = _until(lambda: [s for s in api.replies(chat) if s.edits and s.edits[-1].startswith("Sorry")],
                        what="the polite error")[0].edits[-1]
        assert "couldn't answer" in polite and "Traceback" not in polite
    finally:
        bot.terminate()
        bot.wait(20)
        log.close()
        api.stop()
    summary = httpx.get(f"{gw.url}/v1/channels/{payer.channel['channel_id']}", timeout=30).json()
    assert summary["seqno"] == 3 and summary["charged"] > 0, summary
    assert _ledger(gw)["verify"]["ok"]


# -- the provider view (last in the module: a registered provider node takes tenant placement while it is listed) ----

def _seed_node_books(gw: GatewayProc, node_id: str, amounts: list[int]) -> None:
    """Paid calls served by ``node_id``, booked through the gateway's own ledger code on its ledger file (the
    node here never joins Ray, so no call can run on it): a channel of a fresh caller, a signed state per call, a
    hold, a charge crediting the node. Then funds for the operator's payouts on the local chain."""
    import secrets

    from cocoon_faas.gateway.billing import load_operator_key
    from cocoon_faas.gateway.ledger import Ledger
    from cocoon_faas.gateway.payments import PaymentGate
    from cocoon_faas.settings import Settings
    from cocoon_faas.ton.client import ChannelSigner
    from cocoon_faas.ton.keys import PrivateKey

    op = load_operator_key(Settings(home=gw.home))
    caller, cid = PrivateKey.generate(), secrets.randbits(62)
    ledger = Ledger(gw.home / "ledger.db")
    try:
        ledger.add_channel(cid, caller.public_key(), op.public_key(), "0:" + "00" * 32, "web-test", 10**9)
        gate = PaymentGate(ledger, op)
        signer = ChannelSigner(gw.home.parent / f"seed-{cid}.json", caller, cid, 10**9)
        for i, amount in enumerate(amounts):
            t = signer.sign_for_call(10**7)
            hold = gate.authorize(t.header, f"seed-{cid}-{i}", "greet", 10**7)
            signer.complete(t, gate.settle(hold, node_id, amount, "web-test-dev", 0))
    finally:
        ledger.close()
    from cocoon_faas.ton.chain import LocalChain
    from cocoon_faas.ton.wallet import Wallet

    # the operator's wallet on the local chain funds the payout channel the payout below opens
    LocalChain(gw.home / "chain.db").faucet(Wallet(op.public_key()).address, 2 * 10**9)


def test_dashboard_provider_session(gw: GatewayProc, chromium: Any, tmp_path: Path) -> None:
    """`cocoon provider login` signs the gateway's challenge with the wallet key and prints a one-time link; the
    page trades it for an HttpOnly session cookie and shows this provider's nodes, earnings, payouts and what is
    due, with charts; the link does not work twice; an API key does not open the view; logout ends it."""
    import base64

    from selenium.webdriver.common.by import By

    from cocoon_faas.gateway.billing import load_operator_key
    from cocoon_faas.runtime.hardware import GIB, Hardware
    from cocoon_faas.runtime.registration import Registration
    from cocoon_faas.settings import Settings
    from cocoon_faas.ton.channel import SignedSemiChannel
    from cocoon_faas.ton.keys import PrivateKey
    from cocoon_faas.ton.wallet import Wallet

    key = PrivateKey.generate()
    wallet = Wallet(key.public_key()).address.friendly()
    reg = Registration.new(wallet=wallet, public_key=key.public_key().to_bytes(), name="web-rig",
                           hardware=Hardware("declared", "H100", 1, 80 * GIB, None, 8, 32 * GIB), gpu_price=10**6)
    r = httpx.post(gw.url + "/v1/providers", json=reg.signed(key), timeout=30)
    assert r.status_code == 201, r.text
    nid, token = r.json()["node_id"], r.json()["token"]
    browser = chromium
    try:
        _seed_node_books(gw, nid, [40_000, 25_000])
        paid = httpx.post(f"{gw.url}/v1/ledger/providers/{nid}/payout", headers=gw.headers(), timeout=60,
                          json={"public_key": key.public_key().hex(), "wallet": wallet, "amount": 50_000})
        assert paid.status_code == 200, paid.text
        seed = tmp_path / "wallet.seed"
        seed.write_text(key.to_bytes().hex())
        stranger = tmp_path / "stranger.seed"  # a wallet with no node here: a clear refusal, no link
        stranger.write_text(PrivateKey.generate().to_bytes().hex())
        refused = gw.cli("provider", "login", "--key-file", str(stranger), check=False)
        assert refused.returncode == 1 and "has no node on this gateway" in refused.stderr, refused.stderr
        out = json.loads(gw.cli("provider", "login", "--key-file", str(seed), "--json").stdout)
        assert out["url"] == f"{gw.url}/dashboard#provider-code={out['code']}"
        browser.get(gw.url + "/dashboard")  # a tenant's key first: the provider view stays shut to it
        assert browser.execute_script("""return fetch('/dashboard/api/provider/me',
            {headers: {Authorization: 'Bearer ' + arguments[0]}}).then(r => r.status)""", gw.key) == 401
        browser.get(out["url"])
        row = (By.CSS_SELECTOR, f'#provider-nodes tr[data-node="{nid}"]')
        _wait(browser, lambda d: d.find_elements(*row))
        assert browser.current_url == gw.url + "/dashboard"  # the code left the address bar
        cells = [td.text for td in browser.find_element(*row).find_elements(By.TAG_NAME, "td")]
        assert cells[1:3] == ["web-rig", "H100-80GB x1"] and cells[8:] == ["65000", "50000", "15000"]
        assert browser.find_element(By.ID, "provider-pending").get_attribute("data-due") == "15000"
        assert "awaiting the operator's payout" in browser.find_element(By.ID, "provider-pending").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#provider-payouts tbody tr")) == 1
        tds = browser.find_element(By.CSS_SELECTOR, "#provider-channels tbody tr").find_elements(By.TAG_NAME, "td")
        cells = [td.text for td in tds]  # channel, node, deposit, paid through it, left, seqno, status, state
        assert cells[0] == str(paid.json()["channel_id"]) and cells[1] == nid and cells[3] == "50000"
        assert cells[5:7] == ["1", "open"] and int(cells[2]) - 50_000 == int(cells[4])
        state = SignedSemiChannel.from_boc(base64.b64decode(tds[7].get_attribute("data-boc")))
        assert state.is_signed_by(load_operator_key(Settings(home=gw.home)).public_key())
        assert state.state.data.sent == 50_000  # what the provider closes the channel with on chain
        _wait(browser, lambda d: int(d.find_element(By.ID, "chart-provider-earnings").get_attribute("data-points")
                                     or 0) >= 3)
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-provider-earnings canvas")
        cookie = browser.get_cookie("cocoon_provider")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
        assert browser.execute_script("return document.cookie").find("cocoon_provider") < 0  # not readable by JS
        _shot(browser, "dashboard-provider.png")
        browser.get(out["url"].replace("/dashboard#", "/dashboard?again=1#"))  # the same link again: refused
        _wait(browser, lambda d: "already used" in d.find_element(By.ID, "provider-error").text)
        browser.get(gw.url + "/dashboard")  # the session from before the refused link still holds
        _wait(browser, lambda d: d.find_elements(*row))
        _click(browser, (By.ID, "logout"))
        _wait(browser, lambda d: not d.find_element(By.ID, "login-view").get_attribute("hidden")
              and not d.get_cookie("cocoon_provider"))
        r = httpx.get(gw.url + "/dashboard/api/provider/me", cookies={"cocoon_provider": cookie["value"]}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["reason"] == "unknown"  # ended on the gateway too
    finally:
        httpx.post(f"{gw.url}/v1/providers/{nid}/leave", headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert _ledger(gw)["verify"]["ok"]


# A wallet extension as TON Connect's JS bridge puts it in the page (window[<key>].tonconnect): it fetches the app's
# manifest, signs the gateway's payload for the manifest's host with WebCrypto's Ed25519 (the spec's message, built
# here in JS: what the gateway checks in Python), and answers the connect event a wallet answers.
_FAKE_WALLET = """
window.testwallet = { tonconnect: { protocolVersion: 2, isWalletBrowser: false, walletInfo: { name: "Test wallet" },
  async connect(version, req) {
    window.__tcRequest = req;
    const cfg = %s, enc = new TextEncoder();
    const payload = req.items.find((i) => i.name === "ton_proof").payload;
    const domain = new URL((await (await fetch(req.manifestUrl)).json()).url).host, d = enc.encode(domain);
    const ts = Math.floor(Date.now() / 1000), hash = Uint8Array.from(cfg.hash.match(/../g).map((h) => parseInt(h, 16)));
    const head = new Uint8Array(4 + 32 + 4), dv = new DataView(head.buffer);
    dv.setInt32(0, cfg.workchain, false); head.set(hash, 4); dv.setUint32(36, d.length, true);
    const t = new Uint8Array(8); new DataView(t.buffer).setBigUint64(0, BigInt(ts), true);
    const cat = (...a) => { const o = new Uint8Array(a.reduce((n, x) => n + x.length, 0)); let i = 0;
      for (const x of a) { o.set(x, i); i += x.length; } return o; };
    const sha = async (b) => new Uint8Array(await crypto.subtle.digest("SHA-256", b));
    const inner = await sha(cat(enc.encode("ton-proof-item-v2/"), head, d, t, enc.encode(payload)));
    const full = await sha(cat(new Uint8Array([0xff, 0xff]), enc.encode("ton-connect"), inner));
    const key = await crypto.subtle.importKey("pkcs8", Uint8Array.from(atob(cfg.pkcs8), (c) => c.charCodeAt(0)),
      { name: "Ed25519" }, false, ["sign"]);
    const sig = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key, full));
    return { event: "connect", id: 1, payload: { device: { platform: "linux", appName: "test" }, items: [
      { name: "ton_addr", address: cfg.raw, network: "-239", publicKey: cfg.pub, walletStateInit: cfg.stateInit },
      { name: "ton_proof", proof: { timestamp: ts, domain: { lengthBytes: d.length, value: domain }, payload,
        signature: btoa(String.fromCharCode(...sig)) } }] } };
  } } };
"""


def test_dashboard_provider_logs_in_with_a_ton_wallet(gw: GatewayProc, chromium: Any) -> None:
    """No CLI: a provider whose node joined with a v4R2 wallet (TON Connect wallets are v4R2/v5R1) presses "Log in
    with a TON wallet"; the wallet in the page signs the gateway's ton_proof payload; the gateway checks it and the
    page shows that provider's nodes and books. Then the documented hook takes a TON Connect SDK `Wallet` object
    (signed in Python) the same way, and a replayed proof is refused."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from selenium.webdriver.common.by import By

    from cocoon_faas.gateway.ton_proof import proof_message
    from cocoon_faas.runtime.hardware import GIB, Hardware
    from cocoon_faas.runtime.registration import Registration
    from cocoon_faas.ton.keys import PrivateKey
    from cocoon_faas.ton.wallet import Wallet

    key = PrivateKey.generate()
    w = Wallet(key.public_key(), version="v4r2")
    reg = Registration.new(wallet=w.address.friendly(bounceable=False), public_key=key.public_key().to_bytes(),
                           name="ton-rig", hardware=Hardware("declared", "L4", 1, 24 * GIB, None, 4, 16 * GIB),
                           gpu_price=10**6, wallet_version="v4r2")
    r = httpx.post(gw.url + "/v1/providers", json=reg.signed(key), timeout=30)
    assert r.status_code == 201, r.text
    nid, token = r.json()["node_id"], r.json()["token"]
    browser, row = chromium, (By.CSS_SELECTOR, f'#provider-nodes tr[data-node="{nid}"]')
    state_init = base64.b64encode(w.state_init().to_boc()).decode()
    pkcs8 = Ed25519PrivateKey.from_private_bytes(key.to_bytes()).private_bytes(Encoding.DER, PrivateFormat.PKCS8,
                                                                               NoEncryption())
    cfg = {"raw": w.address.raw, "workchain": 0, "hash": w.address.hash.hex(), "pub": key.public_key().raw.hex(),
           "stateInit": state_init, "pkcs8": base64.b64encode(pkcs8).decode()}
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _FAKE_WALLET % json.dumps(cfg)})
    try:
        _seed_node_books(gw, nid, [30_000])
        browser.get(gw.url + "/dashboard")
        _click(browser, (By.ID, "ton-login"))
        _wait(browser, lambda d: d.find_elements(*row) or "refused" in d.find_element(By.ID, "ton-error").text
              or "No TON" in d.find_element(By.ID, "ton-error").text)
        assert browser.find_elements(*row), browser.find_element(By.ID, "ton-error").text
        cells = [td.text for td in browser.find_element(*row).find_elements(By.TAG_NAME, "td")]
        assert cells[1] == "ton-rig" and cells[8] == "30000"
        assert browser.find_element(By.ID, "provider-app").get_attribute("data-wallet") == w.address.raw
        req = browser.execute_script("return window.__tcRequest")
        assert req["manifestUrl"] == gw.url + "/dashboard/tonconnect-manifest.json"
        assert [i["name"] for i in req["items"]] == ["ton_addr", "ton_proof"]
        manifest = httpx.get(req["manifestUrl"], timeout=30).json()
        assert manifest["url"] == gw.url and httpx.get(manifest["iconUrl"], timeout=30).status_code == 200
        cookie = browser.get_cookie("cocoon_provider")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
        _shot(browser, "dashboard-ton-login.png")
        _click(browser, (By.ID, "logout"))
        _wait(browser, lambda d: not d.find_element(By.ID, "login-view").get_attribute("hidden")
              and not d.get_cookie("cocoon_provider"))
        # the hook, as a page embedding @tonconnect/ui calls it with the SDK's Wallet
        payload = httpx.post(gw.url + "/dashboard/api/provider/ton-proof/payload", timeout=30).json()["payload"]
        domain, ts = gw.url.split("://")[1], int(time.time())
        sig = key.sign(proof_message(w.address, domain, ts, payload))
        sdk_wallet = {"account": {"address": w.address.raw, "chain": "-239", "publicKey": key.public_key().raw.hex(),
                                  "walletStateInit": state_init},
                      "connectItems": {"tonProof": {"name": "ton_proof", "proof": {
                          "timestamp": ts, "domain": {"lengthBytes": len(domain), "value": domain},
                          "payload": payload, "signature": base64.b64encode(sig).decode()}}}}
        out = browser.execute_async_script("window.cocoonTonProof.login(arguments[0]).then(arguments[1], "
                                           "(e) => arguments[1]({error: e.message}))", sdk_wallet)
        assert out == {"wallet": w.address.raw}, out
        _wait(browser, lambda d: d.find_elements(*row))
        again = browser.execute_async_script("window.cocoonTonProof.login(arguments[0]).then(arguments[1], "
                                             "(e) => arguments[1]({error: e.message}))", sdk_wallet)
        assert "already used" in again["error"]
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
        httpx.post(f"{gw.url}/v1/providers/{nid}/leave", headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert _ledger(gw)["verify"]["ok"]
