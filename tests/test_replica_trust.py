"""The gateway trusts nothing a replica sends: a hostile replica actor on a real local Ray tries to make the
gateway unpickle an object whose loading writes a marker file, through every channel it has (its start task's
return value, its start-up facts, its frames' meta and bodies, its logs, its answers to UNLOCK and GRANT). The
marker never appears; the honest parts of the exchange still work."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from cocoon_faas import protocol as P
from cocoon_faas.errors import NoCapacityError, ReplicaLostError
from cocoon_faas.gateway.controller import Controller, DeploymentFlags, FunctionRuntime, RayBackend
from cocoon_faas.gateway.dispatch import Route, unary
from cocoon_faas.gateway.store import Store
from cocoon_faas.settings import Settings
from cocoon_faas.signature import Signature
from cocoon_faas.spec import make_spec

pytestmark = pytest.mark.e2e


class Evil:
    """Unpickling this creates `path`: the proof that someone unpickled what a replica produced."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


class HostileReplica:
    """Speaks just enough of the replica's protocol to be started and called, and poisons every answer."""

    def __init__(self, function: str, version: int, blob: bytes, spec_json: dict[str, Any], host: str,
                 forward_logs: bool = True, replica_id: str = "", secret: bytes = b"", sandbox: bool = True,
                 models_dir: str | None = None) -> None:
        self.marker = spec_json["env"]["MARKER"]
        self.mode = spec_json["env"]["MODE"]
        self.replica_id = replica_id

    async def start(self) -> Any:
        from ray.experimental import internal_kv

        from cocoon_faas.runtime.replica import FACTS_NAMESPACE, facts_key

        poison = pickle.dumps(Evil(self.marker))
        if self.mode == "pickled_facts":
            facts = poison
        else:
            server = await asyncio.get_running_loop().create_server(self._conn, "127.0.0.1", 0)
            self.server = server
            facts = json.dumps({"ok": True, "host": "127.0.0.1", "port": server.sockets[0].getsockname()[1],
                                "logs": [["stdout", poison.hex()]], "evil": poison.hex()}).encode()
        internal_kv._internal_kv_put(facts_key(self.replica_id), facts, namespace=FACTS_NAMESPACE)
        return Evil(self.marker)  # the start task's value: the gateway must never fetch it

    def _conn(self) -> asyncio.Protocol:
        poison = pickle.dumps(Evil(self.marker))
        state: dict[str, Any] = {}

        def on_frame(call: int, ftype: int, meta: Any, body: bytes) -> None:
            send = state["proto"].send
            if ftype == P.HELLO:
                send(P.encode(call, P.HELLO, {"evil": poison.hex()}, poison))
            elif ftype == P.CALL and meta.get("id") == "raw-pickle-meta":
                send(P.HEADER.pack(13 + len(poison), call, P.RESULT, len(poison)) + poison)
            elif ftype == P.CALL:
                send(P.encode(call, P.RESULT, {"ms": 1.0, "logs": [["stderr", poison.hex()]], "evil": poison.hex()},
                              poison))
            elif ftype == P.UNLOCK:
                send(P.encode(call, P.RESULT, {"ok": True, "message": poison.hex()}, poison))
            elif ftype == P.GRANT:
                send(P.encode(call, P.RESULT, None, poison))

        proto = P.FrameProtocol(on_frame)
        state["proto"] = proto
        return proto


class HostileBackend(RayBackend):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._actor_cls = self.ray.remote(HostileReplica)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """The embedded default, started exactly as `cocoon serve` starts it."""
    import ray

    from cocoon_faas.gateway.server import init_ray

    init_ray(Settings(home=tmp_path_factory.mktemp("home"), ray_num_cpus=2))
    yield ray
    ray.shutdown()


def _runtime(mode: str, marker: Path) -> FunctionRuntime:
    spec = make_spec(name="f", cpu=0.1, memory="64Mi", timeout=10, env={"MARKER": str(marker), "MODE": mode})
    return FunctionRuntime("f", "dev", 1, spec, Signature.of(lambda: None), "m", b"", DeploymentFlags())


def test_the_poison_works_when_unpickled(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(str(control))))
    assert control.exists()  # so its absence below means nobody unpickled it


def test_pickled_start_up_facts_are_refused(ray_local, tmp_path):
    marker = tmp_path / "pwned"
    settings = Settings(home=tmp_path, replica_start_timeout_s=60)
    ctl = Controller(Store(tmp_path / "db.sqlite"), settings, HostileBackend(settings))

    async def main() -> None:
        with pytest.raises(NoCapacityError, match="refuses"):
            await ctl._start_replica(_runtime("pickled_facts", marker))

    asyncio.run(main())
    assert not marker.exists()


def test_a_hostile_replica_cannot_run_code_in_the_gateway(ray_local, tmp_path):
    from cocoon_faas.gateway.routes_attest import unlock

    marker = tmp_path / "pwned"
    settings = Settings(home=tmp_path, replica_start_timeout_s=60)
    ctl = Controller(Store(tmp_path / "db.sqlite"), settings, HostileBackend(settings))
    fr = _runtime("frames", marker)
    poison = pickle.dumps(Evil(str(marker)))

    async def main() -> None:
        r = await ctl._start_replica(fr)  # facts (with a poisoned log line and field) decoded as JSON bytes
        assert "evil" not in r.extra
        r.state = "ready"
        fr.ready.append(r)
        fr.all.add(r)
        ctl.functions["f"] = fr
        ans = await unary(ctl, fr, b"{}", {"id": "c1"}, Route())
        assert ans.error is None
        assert ans.body == poison  # the result is opaque bytes handed to the caller, never loaded
        assert "evil" not in ans.meta and ans.meta["logs"] == [("stderr", poison.hex())]  # logs are text
        res = await unlock(r, b"grant")
        assert res["ok"] is True and res["message"] == poison.hex()
        grant = await r.control(P.GRANT, None, b"{}", 10)
        assert grant.body == poison
        ans = await unary(ctl, fr, b"{}", {"id": "raw-pickle-meta"}, Route())
        assert ans.body is None and isinstance(ans.error, ReplicaLostError) and "frame" in ans.error.message
        assert r.state == "dead"  # the replica that broke the protocol is dropped
        ctl.functions.pop("f")
        ctl._kill(r)

    asyncio.run(asyncio.wait_for(main(), 120))
    assert not marker.exists()


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, owner) of every TCP listener of these processes: `ss -ltnp`, or psutil where ss is missing."""
    import re
    import shutil
    import subprocess

    import psutil

    if shutil.which("ss"):
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        return [(line.split()[3], line) for line in out.splitlines()
                if {int(x) for x in re.findall(r"pid=(\d+)", line)} & pids]
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [(f"{c.laddr.ip}:{c.laddr.port}", f"pid {pid}") for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_nothing_the_embedded_ray_starts_listens_beyond_loopback(ray_local):
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = _listening(ours)
    assert len(listening) >= 2  # Ray's GCS and raylet at least
    for local, owner in listening:
        host = local.rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), owner
