"""The provider node agent: register with the gateway, run a Ray worker node, heartbeat, drain and leave.

What ``cocoon provider join`` runs on a provider's machine:

1. sign a registration (runtime/registration.py) with the wallet key, attach the node's attestation
   (runtime/node_attestation.py) and POST it to ``/v1/providers``; the gateway answers with the node id and the
   session token, Ray address and Ray token, sealed to the attested key when it admits attested nodes only;
2. ``ray start --address <gcs> --block`` with resources describing the hardware (``gpu:H100``, the per-node
   ``cocoon-node:<id>`` pin; see runtime/hardware.py) so the gateway's controller can place replicas here;
3. heartbeat every interval; a heartbeat answered 404 (gateway restarted) re-registers; if the Ray node dies
   (its raylet killed), the agent stops heartbeating at once so the gateway marks it down within 3 intervals;
4. on ``leave`` (or SIGINT/SIGTERM): ask the gateway to drain, wait until it reports the node ``left`` (replicas
   moved, in-flight calls finished), then stop the Ray node.

``ray start --block`` keeps the node's processes children of one process that exits when any of them dies, which
is how the agent notices a dead raylet without polling Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cocoon_faas.errors import (
    CocoonError,
    GatewayUnreachableError,
    NotFoundError,
    PermissionDeniedError,
    error_from_body,
)
from cocoon_faas.runtime.hardware import Hardware
from cocoon_faas.runtime.node_attestation import NodeIdentity
from cocoon_faas.runtime.registration import Registration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinInfo:
    """The gateway's answer to a registration."""

    node_id: str
    token: str
    ray_address: str
    heartbeat_interval_s: float
    resources: dict[str, float]
    ray_token: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JoinInfo:
        return cls(str(d["node_id"]), str(d["token"]), str(d["ray_address"]), float(d["heartbeat_interval_s"]),
                   {str(k): float(v) for k, v in d["resources"].items()},
                   str(d["ray_token"]) if d.get("ray_token") else None)

    def ray_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for ``ray start``: the cluster's auth token, or auth explicitly off without one."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if self.ray_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.ray_token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
            env.pop("RAY_AUTH_TOKEN", None)
        return env


def ray_start_command(info: JoinInfo, hw: Hardware, *, node_ip: str = "127.0.0.1", temp_dir: str | None = None,
                      object_store_memory: int | None = None, block: bool = True, ray_bin: str | None = None,
                      extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``ray start`` line that joins this machine to the cluster with resources describing it.

    ``extra_args`` go through as they are (e.g. explicit ``--dashboard-agent-listen-port`` and friends when
    several nodes share one machine, as in tests: Ray's default agent ports would collide).
    """
    ray = ray_bin or shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", f"--address={info.ray_address}", f"--num-cpus={hw.cpus}", f"--num-gpus={hw.gpu_count}",
           f"--resources={json.dumps(info.resources, sort_keys=True)}", f"--node-ip-address={node_ip}",
           "--disable-usage-stats"]
    if hw.memory:
        cmd.append(f"--memory={hw.memory}")
    if object_store_memory:
        cmd.append(f"--object-store-memory={object_store_memory}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    cmd.extend(extra_args)
    if block:
        cmd.append("--block")
    return cmd


def host_load(cpus: int) -> float:
    """Utilisation reported with heartbeats: the 1-minute load average per advertised CPU."""
    try:
        return round(os.getloadavg()[0] / max(1, cpus), 3)
    except OSError:
        return 0.0


class GatewayLink:
    """The agent's HTTP calls to the gateway (errors mapped back into the CocoonError tree)."""

    def __init__(self, gateway_url: str, *, client: httpx.Client | None = None, timeout: float = 10.0) -> None:
        self.url = gateway_url.rstrip("/")
        self._http = client or httpx.Client(timeout=timeout)

    def call(self, method: str, path: str, *, token: str | None = None, body: Any = None) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            resp = self._http.request(method, self.url + path, json=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise GatewayUnreachableError(f"cannot reach the gateway at {self.url} ({exc}); check --gateway "
                                          "and that it is running") from None
        try:
            data = resp.json()
        except ValueError:
            data = resp.text
        if resp.status_code >= 400 or not isinstance(data, dict):  # every gateway route answers a JSON object
            raise error_from_body(resp.status_code, data)
        return data

    def close(self) -> None:
        self._http.close()


class NodeAgent:
    """One provider node: registration, the Ray worker process, heartbeats and a draining leave."""

    def __init__(self, link: GatewayLink, key: Any, *, wallet: str, hardware: Hardware, gpu_price: int,
                 cpu_price: int = 0, wallet_version: str = "v3r2", name: str | None = None,
                 temp_dir: str | None = None, object_store_memory: int | None = None,
                 ray_args: list[str] | tuple[str, ...] = (), load: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.time, attestation: str | None = None,
                 home: Path | None = None) -> None:
        self.link = link
        self.key = key  # a cocoon_faas.ton.keys.PrivateKey
        self.wallet, self.wallet_version = wallet, wallet_version
        self.hardware = hardware
        self.gpu_price, self.cpu_price = gpu_price, cpu_price
        self.name = name or socket.gethostname()
        self.temp_dir, self.object_store_memory = temp_dir, object_store_memory
        self.ray_args = tuple(ray_args)
        self._load = load or (lambda: host_load(hardware.cpus))
        self._clock = clock
        self.attestation, self.home = attestation, home  # "tdx" | "dev" | None (see runtime/node_attestation.py)
        self.info: JoinInfo | None = None
        self.ray: subprocess.Popen[bytes] | None = None
        self.status = "new"
        self._stop = threading.Event()
        self._leaving = False

    # --- steps ----------------------------------------------------------------------------------------
    def register(self) -> JoinInfo:
        pk = self.key.public_key().to_bytes()
        identity = None
        if self.attestation is not None:  # fresh keys per registration: the sealed answer opens only here
            identity = NodeIdentity.create(pk, evidence=self.attestation, home=self.home)
        reg = Registration.new(wallet=self.wallet, public_key=pk, name=self.name,
                               hardware=self.hardware, gpu_price=self.gpu_price, cpu_price=self.cpu_price,
                               wallet_version=self.wallet_version, now=self._clock(),
                               attestation_kid=identity.key_id if identity is not None else "")
        answer = self.link.call("POST", "/v1/providers",
                                body=reg.signed(self.key, identity.document if identity is not None else None))
        if "sealed" in answer:
            if identity is None:
                raise CocoonError("the gateway sealed its answer but this node sent no attestation; join with "
                                  "--attestation")
            answer.update(identity.open_secrets(str(answer["sealed"]), str(answer["node_id"])))
        self.info = JoinInfo.from_dict(answer)
        self.status = "up"
        return self.info

    def start_ray(self, log_file: Path | None = None) -> subprocess.Popen[bytes]:
        """Start the Ray worker node (``ray start --block``) and wait until it has joined."""
        info = self._need_info()
        cmd = ray_start_command(info, self.hardware, temp_dir=self.temp_dir,
                                object_store_memory=self.object_store_memory, extra_args=self.ray_args)
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        self.ray = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=info.ray_env())
        return self.ray

    def ray_alive(self) -> bool:
        return self.ray is not None and self.ray.poll() is None

    def heartbeat(self) -> str:
        """One heartbeat; re-registers when the gateway forgot the node (restart). Returns the node status."""
        info = self._need_info()
        try:
            ans = self.link.call("POST", f"/v1/providers/{info.node_id}/heartbeat", token=info.token,
                                 body={"load": self._load()})
        except CocoonError as exc:
            if exc.status not in (401, 404) or self._leaving:
                raise
            log.warning("gateway does not know node %s (%s); registering again", info.node_id, exc.message)
            try:
                self.register()
            except PermissionDeniedError as refused:  # revoked meanwhile: stop serving the cluster
                log.error("the gateway refuses this node now: %s", refused.message)
                self.status = "refused"
                self._stop.set()
            return self.status
        self.status = str(ans.get("status", "up"))
        return self.status

    def leave(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> str:
        """Drain through the gateway, wait until it reports ``left`` (or timeout), then stop the Ray node."""
        info = self._need_info()
        self._leaving = True
        try:
            self.status = str(self.link.call("POST", f"/v1/providers/{info.node_id}/leave",
                                             token=info.token)["status"])
            deadline = time.monotonic() + timeout_s
            while self.status != "left" and time.monotonic() < deadline:
                time.sleep(poll_s)
                try:
                    self.status = str(self.link.call("GET", f"/v1/providers/{info.node_id}")["status"])
                except NotFoundError:
                    self.status = "left"
                if self.status == "down":  # the gateway gave up on it: nothing left to drain
                    break
        finally:
            self.stop_ray()
            self._stop.set()
        return self.status

    def stop_ray(self, timeout_s: float = 20.0) -> None:
        """Stop the Ray worker node: SIGTERM to ``ray start --block`` (it stops its processes), then SIGKILL."""
        proc, self.ray = self.ray, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self, on_status: Callable[[str], None] | None = None) -> str:
        """Heartbeat until stopped, left, or the Ray node died; returns why it ended."""
        info = self._need_info()
        while not self._stop.is_set():
            if self.ray is not None and not self.ray_alive():
                self.status = "ray-died"  # stop heartbeating: the gateway marks the node down
                break
            try:
                status = self.heartbeat()
            except GatewayUnreachableError as exc:
                log.warning("%s", exc.message)
                status = self.status
            if on_status:
                on_status(status)
            if status in ("left", "refused"):
                break
            self._stop.wait(info.heartbeat_interval_s)
        return self.status

    def stop(self) -> None:
        self._stop.set()

    def _need_info(self) -> JoinInfo:
        if self.info is None:
            raise CocoonError("the node has not registered yet; call register() first")
        return self.info
