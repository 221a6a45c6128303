"""Shared fixtures: a real gateway (`cocoon serve` under uvicorn on 127.0.0.1) with a real local Ray."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TESTDATA = SHARED / "testdata"
# Converted model weights are shared by every test gateway (convert once, ~0.5 GB).
MODELS_DIR = os.environ.get("COCOON_MODELS_DIR", str(Path.home() / ".cache" / "cocoon-models"))


# Knobs of the test harness itself, not platform settings: they survive the isolation below.
HARNESS_VARS = frozenset({"COCOON_MODELS_DIR", "COCOON_SCREENSHOTS", "COCOON_TESTDATA", "COCOON_TEST_CACHE",
                          "COCOON_KEEP_RAY_TMP"})


def _isolate_from_the_users_home() -> None:
    """Tests never read the user's own ~/.cocoon (its API key, channel or config.env would change what a client
    sends): the test process gets a fresh COCOON_HOME and none of the user's COCOON_* settings, before
    cocoon_faas.settings is first imported."""
    for k in [k for k in os.environ if k.startswith("COCOON_") and k not in HARNESS_VARS]:
        del os.environ[k]
    home = tempfile.mkdtemp(prefix="cocoon-test-home-")
    atexit.register(shutil.rmtree, home, True)
    os.environ["COCOON_HOME"] = home
    os.environ["COCOON_MODELS_DIR"] = MODELS_DIR  # a cache of converted public weights, not the user's settings


_isolate_from_the_users_home()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProc:
    """A `cocoon serve` subprocess with its own COCOON_HOME."""

    def __init__(self, home: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "COCOON_HOME": str(home),
            "COCOON_GATEWAY_URL": self.url,
            "COCOON_RAY_NUM_CPUS": "8",
            "COCOON_MAX_BODY_BYTES": "262144",
            "COCOON_QUEUE_LIMIT": "4",
            "COCOON_SCALE_DOWN_DELAY_S": "3",
            "COCOON_STREAM_STALL_S": "20",  # tests/test_e2e_flow.py: a client that never reads again is cut
            "PYTHONUNBUFFERED": "1",
            "COCOON_MODELS_DIR": MODELS_DIR,
            **(env or {}),
        }
        self.env.pop("COCOON_API_KEY", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "gateway.log"

    def start(self, timeout: float = 90) -> GatewayProc:
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cocoon_faas", "serve", "--port", str(self.port)],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway did not start: {self.log.read_text()[-3000:]}")

    @property
    def key(self) -> str:
        return (self.home / "api_key").read_text().strip()

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60, **kw)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"cocoon {' '.join(args)} failed ({r.returncode}): {r.stdout}\n{r.stderr}")
        return r

    def kill(self) -> None:
        """SIGKILL the gateway's whole process group (uvicorn and the Ray it started)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:  # Ray processes left behind share the gateway's process group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # RAY_ADDRESS names a dead cluster, as /tmp/ray/ray_current_cluster does on any machine where `ray start`
    # once ran: the embedded default must start its own Ray anyway (it used to join that one and die).
    gw = GatewayProc(tmp_path_factory.mktemp("gw") / "home", env={"RAY_ADDRESS": "127.0.0.1:9"}).start()
    gw.cli("deploy", str(ROOT / "examples" / "hello.py"))
    gw.cli("deploy", str(ROOT / "tests" / "apps" / "edge.py"))
    yield gw
    gw.stop()


def sse_events(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        event, data = "message", None
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:].strip())
        out.append((event, data))
    return out


@pytest.fixture(scope="session")
def pg_cluster() -> Any:
    """One throwaway PostgreSQL server for the session (tests/pg.py); skipped only where it cannot run."""
    from tests.pg import PgCluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A fresh, empty database on each backend: a factory returning a new `Database` to the same place (as a
    second gateway or a restarted one would open it). Every database it opened is closed afterwards."""
    from cocoon_faas.gateway.db import open_database

    where: Any = tmp_path / "db.sqlite" if request.param == "sqlite" else \
        request.getfixturevalue("pg_cluster").new_database()
    opened: list[Any] = []

    def connect() -> Any:
        db = open_database(where)
        opened.append(db)
        return db

    connect.backend = request.param  # type: ignore[attr-defined]
    yield connect
    for db in opened:
        try:
            db.close()
        except Exception:  # noqa: BLE001 - already closed by the test
            pass
