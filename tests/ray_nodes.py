"""Test helper: a private multi-node Ray cluster on this machine (head + provider nodes joined by the agent).

Every process lives under one unique ``--temp-dir``; teardown kills exactly the processes whose command line
names it (never ``ray stop``, which would stop other local clusters too).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Fast node-death detection for tests: the GCS health-checks raylets every 500 ms, 3 misses = dead.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_ports() -> list[str]:
    """Explicit ports for one more Ray node on this machine (Ray's default agent ports collide)."""
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    return [f"{f}={free_port()}" for f in flags] + ["--include-log-monitor=false"]


class RayCluster:
    """A head node with one CPU and no custom resources; provider nodes join through the node agent."""

    def __init__(self, num_cpus: int = 1) -> None:
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="cocoon-mkt-", dir="/tmp")
        self.port = free_port()
        self.address = ""
        # Ray >= 2.5x turns token auth on when ~/.ray/auth_token exists; this cluster has its own token.
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start_head(self) -> str:
        env = {**self.env, **FAST_HEALTH}
        for attempt in range(3):  # free ports are picked before Ray binds them: another process may win one
            proc = subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                                   f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                                   "--disable-usage-stats", "--object-store-memory=80000000",
                                   f"--ray-client-server-port={free_port()}", *node_ports()],
                                  env=env, capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                break
            if attempt == 2:
                raise RuntimeError(f"ray start --head failed: {(proc.stderr or proc.stdout)[-2000:]}")
            self.port = free_port()
            time.sleep(1)
        # Ray resolves 127.0.0.1 to this host's own address; read back what the GCS listens on.
        self.address = Path(self.temp_dir, "ray_current_cluster").read_text().strip() \
            if Path(self.temp_dir, "ray_current_cluster").exists() else f"127.0.0.1:{self.port}"
        return self.address

    def node_dir(self, name: str) -> str:
        """A node's own temp dir inside the cluster's (socket names would race in a shared one)."""
        path = Path(self.temp_dir, name)
        path.mkdir(exist_ok=True)
        return str(path)

    def driver(self, body: str, timeout: float = 60) -> dict:
        """Run ``body`` in a fresh Python connected to the cluster; it must ``emit(dict)`` its result."""
        code = (f"import json, ray\nray.init(address={self.address!r}, logging_level='ERROR')\n"
                "def emit(d):\n    print('RESULT ' + json.dumps(d), flush=True)\n")
        proc = subprocess.run([sys.executable, "-c", code + textwrap.dedent(body)], capture_output=True,
                              text=True, timeout=timeout, env=self.env)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise AssertionError(f"driver failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")

    def join(self, agent, log_name: str, alive_after: int, attempts: int = 3, timeout: float = 60) -> list[dict]:  # type: ignore[no-untyped-def]
        """Start ``agent``'s Ray node and wait until ``alive_after`` nodes are alive. On a loaded machine a node
        can miss Ray's fixed 30 s start-up deadline; then start it again (the agent sees its process exit)."""
        for attempt in range(attempts):
            agent.start_ray(Path(self.temp_dir) / f"agent-{log_name}.log")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and agent.ray_alive():
                nodes = self.nodes()
                if sum(n["Alive"] for n in nodes) >= alive_after:
                    return nodes
                time.sleep(0.5)
            agent.stop_ray(timeout_s=5)
            if attempt == attempts - 1:
                break
        log = Path(self.temp_dir, f"agent-{log_name}.log")
        raise AssertionError(f"node {log_name} did not join: {log.read_text()[-1500:] if log.exists() else ''}")

    def nodes(self) -> list[dict]:
        return self.driver("emit({'nodes': [{'Alive': n['Alive'], 'Resources': n['Resources'], "
                           "'NodeID': n['NodeID']} for n in ray.nodes()]})")["nodes"]

    def pids(self) -> list[int]:
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if self.temp_dir.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                continue
        return out

    def teardown(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        if not os.environ.get("COCOON_KEEP_RAY_TMP"):
            subprocess.run(["rm", "-rf", self.temp_dir], check=False)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        for c in children.get(cur, []):
            out.append(c)
            todo.append(c)
    return out


def raylet_of(pid: int) -> int:
    for c in descendants(pid):
        try:
            if Path(f"/proc/{c}/comm").read_text().strip() == "raylet":
                return c
        except OSError:
            continue
    raise AssertionError(f"no raylet below process {pid}")


def wait_for(pred, timeout: float, what: str, step: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        val = pred()
        if val:
            return val
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
