"""Tenant code in the bubblewrap sandbox, tried as an attacker would (runtime/sandbox.py, sandbox_link.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from cocoon_faas import protocol as P
from cocoon_faas.runtime.sandbox import SandboxConfig, SandboxProcess, bwrap_argv, bwrap_problem, child_env
from cocoon_faas.runtime.sandbox_link import ChildError, SandboxLink
from cocoon_faas.spec import make_spec

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or bwrap_problem() is not None,
                                reason="bubblewrap cannot create namespaces on this machine")
ROOT = Path(__file__).resolve().parents[1]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the sandbox cannot import the tests package


def run_in_sandbox(fn: Any, calls: list[dict[str, Any]], memory: str = "512Mi", **spec_kw: Any) -> list[Any]:
    """Load `fn` into a fresh sandbox child and make each call; results as JSON values or ChildError metas."""
    spec = make_spec(name="t", memory=memory, max_concurrency=4, **spec_kw)
    blob = cloudpickle.dumps({"format": 1, "kind": "function", "fn": fn})

    async def main() -> list[Any]:
        cfg = SandboxConfig(memory=spec.memory, network=spec.network, env=dict(spec.env))
        link = SandboxLink(SandboxProcess(cfg, f"test-{os.getpid()}-{time.monotonic_ns()}"))
        await link.open()
        try:
            await link.load(blob, spec.to_json(), 60)
            out = []
            for kw in calls:
                try:
                    body, ms = await link.unary(json.dumps(kw).encode(), 30)
                    out.append(json.loads(body))
                except ChildError as exc:
                    out.append(exc.meta)
            return out
        finally:
            link.close()

    return asyncio.run(asyncio.wait_for(main(), 120))


def probe(what: str, arg: str = "") -> Any:
    import os
    import socket

    try:
        if what == "read":
            with open(arg, "rb") as f:
                return {"ok": True, "data": f.read(64).hex()}
        if what == "listdir":
            return {"ok": True, "data": sorted(os.listdir(arg))}
        if what == "write":
            with open(arg, "w") as f:
                f.write("x")
            return {"ok": True}
        if what == "env":
            return {"ok": True, "data": dict(os.environ)}
        if what == "connect":
            host, port = arg.split(":")
            socket.create_connection((host, int(port)), timeout=2).close()
            return {"ok": True}
        if what == "pids":
            return {"ok": True, "data": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}
    raise ValueError(what)


def test_the_tenant_cannot_reach_the_operator_the_gateway_ray_or_the_network(tmp_path, monkeypatch):
    home = tmp_path / "operator-home"
    home.mkdir()
    (home / "api_key").write_text("ck_operator_secret")
    monkeypatch.setenv("COCOON_HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-secret")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    ray_dirs = [p for p in (Path("/tmp/ray"),) if p.exists()]
    with listener:
        got = run_in_sandbox(probe, [
            {"what": "read", "arg": str(home / "api_key")},
            {"what": "read", "arg": f"/proc/{os.getpid()}/environ"},
            {"what": "pids"},
            {"what": "env"},
            {"what": "connect", "arg": f"127.0.0.1:{port}"},
            {"what": "read", "arg": str(ROOT / "pyproject.toml")},
            {"what": "listdir", "arg": "/tmp"},
            {"what": "write", "arg": "/usr/evil"},
            {"what": "listdir", "arg": "/fn"},
            *({"what": "listdir", "arg": str(d)} for d in ray_dirs),
        ])
    operator_key, gateway_proc, pids, env, net, checkout, tmp, usr, workdir, *ray = got
    assert operator_key == {"ok": False, "error": "FileNotFoundError"}
    assert gateway_proc["ok"] is False
    assert pids["ok"] and max(pids["data"]) < 10  # its own PID namespace: only the sandbox's few processes
    assert env["ok"] and not any(k.startswith(("COCOON_", "RAY_")) for k in env["data"])
    assert set(env["data"]) == set(child_env(SandboxConfig(memory=1)).keys()) | {"PWD"}
    assert net == {"ok": False, "error": net["error"]} and net["error"] in ("OSError", "ConnectionRefusedError")
    assert checkout["ok"] is False
    assert tmp == {"ok": True, "data": []} and workdir == {"ok": True, "data": []}
    assert usr["ok"] is False
    for r in ray:
        assert r["ok"] is False
    # the probe itself can read what it is allowed to: a control that the checks above could pass
    assert run_in_sandbox(probe, [{"what": "read", "arg": "/etc/hosts"}])[0]["ok"] is True


def test_network_true_shares_the_host_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        got = run_in_sandbox(probe, [{"what": "connect", "arg": f"127.0.0.1:{listener.getsockname()[1]}"}],
                             network=True)
    assert got == [{"ok": True}]


def test_two_tenants_share_no_files():
    def writer(path: str, data: str) -> dict:
        with open(path, "w") as f:
            f.write(data)
        return {"files": sorted(__import__("os").listdir("/tmp"))}

    a = run_in_sandbox(writer, [{"path": "/tmp/tenant-a-secret", "data": "a"}, {"path": "/fn/a", "data": "a"}])
    assert a[0] == {"files": ["tenant-a-secret"]}
    b = run_in_sandbox(probe, [{"what": "read", "arg": "/tmp/tenant-a-secret"}, {"what": "listdir", "arg": "/tmp"},
                               {"what": "listdir", "arg": "/fn"}])
    assert b == [{"ok": False, "error": "FileNotFoundError"}, {"ok": True, "data": []}, {"ok": True, "data": []}]
    assert not Path("/tmp/tenant-a-secret").exists()  # tmpfs: never on the node's disk


def test_memory_limit_is_a_clear_error_and_the_sandbox_survives():
    def hog(mb: int) -> int:
        blocks = [bytearray(2**20) for _ in range(mb)]
        return len(blocks)

    got = run_in_sandbox(hog, [{"mb": 4096}, {"mb": 8}], memory="256Mi")
    assert got[0]["type"] == "memory_exceeded" and "256 MiB" in got[0]["message"], got[0]
    assert got[1] == 8


def test_the_tenant_cannot_move_its_metering():
    def cheat(seconds: float) -> float:
        import time as t

        start = t.monotonic()
        t.monotonic = lambda: start + 3600.0  # the tenant's own clock says an hour passed
        t.perf_counter = t.monotonic
        t.sleep(seconds)
        return seconds

    spec = make_spec(name="t", memory="256Mi")
    blob = cloudpickle.dumps({"format": 1, "kind": "function", "fn": cheat})

    async def main() -> tuple[float, float]:
        link = SandboxLink(SandboxProcess(SandboxConfig(memory=spec.memory), f"meter-{os.getpid()}"))
        await link.open()
        try:
            await link.load(blob, spec.to_json(), 60)
            t0 = time.monotonic()
            _, ms = await link.unary(b'{"seconds": 0.05}', 30)
            return ms, (time.monotonic() - t0) * 1000
        finally:
            link.close()

    ms, wall = asyncio.run(main())
    assert 50 <= ms <= wall  # measured by the actor side, not by the tenant's clock


def test_argv_binds_nothing_writable_from_the_host():
    argv = bwrap_argv(SandboxConfig(memory=2**30), ["python"])
    binds = [argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--dev-bind")]
    assert binds == []
    assert "--unshare-net" in argv and "--unshare-pid" in argv and "--die-with-parent" in argv
    assert not any(os.path.realpath(argv[i + 1]) == str(ROOT) for i, a in enumerate(argv) if a == "--ro-bind")


def test_the_child_speaks_the_frame_protocol_only_after_load():
    got = run_in_sandbox(probe, [])
    assert got == []
    assert P.LOAD != P.CALL  # LOAD/READY are their own frame types, never sent to the gateway


def test_only_the_nodes_llm_settings_cross_into_the_sandbox(monkeypatch):
    """The node's LLM knobs reach its replicas (they used to be scrubbed, so COCOON_LLM_PRECISION changed nothing);
    no other COCOON_ setting does."""
    monkeypatch.setenv("COCOON_LLM_PRECISION", "gguf")
    monkeypatch.setenv("COCOON_LLM_THREADS", "2")
    monkeypatch.setenv("COCOON_HOME", "/secret/home")
    monkeypatch.setenv("COCOON_API_KEY", "k")
    env = child_env(SandboxConfig(memory=1))
    assert env["COCOON_LLM_PRECISION"] == "gguf" and env["COCOON_LLM_THREADS"] == "2"
    assert not {"COCOON_HOME", "COCOON_API_KEY"} & set(env)
    monkeypatch.delenv("COCOON_LLM_PRECISION")
    assert "COCOON_LLM_PRECISION" not in child_env(SandboxConfig(memory=1))


def _hold_the_gil(seconds: float) -> float:
    """One C call that keeps the GIL throughout (ctypes.PyDLL does not release it): no thread of the process,
    the watchdog included, runs until it returns."""
    import ctypes

    ctypes.PyDLL(None).sleep(int(seconds))
    return seconds


def _gil_call(seconds: float, timeout: float, grace: float, wait: float) -> tuple[Any, int | None, float]:
    """Load `_hold_the_gil` with interrupt grace `grace`, call it once with `timeout`; then wait (up to `wait` s
    after the call began) for the child to end. Returns (the answer or ChildError meta, the child's exit status or
    None, seconds waited)."""
    spec = make_spec(name="t", memory="256Mi", max_concurrency=2)
    blob = cloudpickle.dumps({"format": 1, "kind": "function", "fn": _hold_the_gil})
    lost: list[bool] = []

    async def main() -> tuple[Any, int | None, float]:
        proc = SandboxProcess(SandboxConfig(memory=spec.memory), f"gil-{os.getpid()}-{time.monotonic_ns()}")
        link = SandboxLink(proc, lambda: lost.append(True))
        await link.open()
        try:
            await link.load(blob, spec.to_json(), 60, grace=grace)
            t0 = time.monotonic()
            try:
                body, _ = await link.unary(json.dumps({"seconds": seconds}).encode(), timeout)
                answer: Any = json.loads(body)
            except ChildError as exc:
                answer = exc.meta
            while proc.proc.poll() is None and time.monotonic() - t0 < wait:
                await asyncio.sleep(0.2)
            return answer, proc.proc.poll(), time.monotonic() - t0
        finally:
            link.close()

    answer, status, waited = asyncio.run(asyncio.wait_for(main(), 120))
    if status is not None:
        assert lost == [True]  # the replica hears its child is gone (and is replaced)
    return answer, status, waited


def test_a_call_that_holds_the_gil_past_its_end_is_ended_by_the_actor():
    """The child's watchdog thread cannot run while one C call holds the GIL; the actor reads the child's beacon,
    sees it stale past the call's end plus the grace, and kills the child (SIGKILL: the child could not exit)."""
    answer, status, waited = _gil_call(3600, timeout=0.5, grace=0.3, wait=60)
    assert answer["type"] == "timeout", answer  # the caller has its answer at the limit (the actor's backstop)
    assert status == -9, status  # killed from outside: the child's own watchdog exits with 70
    assert waited < 30


def test_a_call_that_holds_the_gil_within_its_limit_is_left_alone():
    """A beacon gone stale for seconds is not enough: only a stale beacon past a call's end is."""
    answer, status, waited = _gil_call(4, timeout=60, grace=0.3, wait=7)  # the beacon's check sees 4 s stale
    assert answer == 4 and status is None and waited >= 7
