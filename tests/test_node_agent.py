"""The provider node agent: registration, heartbeats, re-join, draining leave, and a real multi-node Ray cluster
(simulated H100 and A100 nodes joined by the agent; placement by custom resources; a SIGKILLed raylet detected)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.gateway.marketplace import DOWN, Marketplace, Requirements
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.runtime import hardware
from cocoon_faas.runtime.node_agent import GatewayLink, JoinInfo, NodeAgent, ray_start_command
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet
from tests.ray_nodes import RayCluster, node_ports, raylet_of, wait_for

pytestmark = pytest.mark.timeout(120)


def make_agent(client: TestClient, gpus: str | None, name: str, price: int = 1000, **kw) -> NodeAgent:
    key = PrivateKey.generate()
    hw = hardware.detect(gpus, cpus=1, memory=512 << 20)
    return NodeAgent(GatewayLink("http://testserver", client=client), key,
                     wallet=Wallet(key.public_key()).address.friendly(), hardware=hw, gpu_price=price,
                     name=name, load=lambda: 0.0, **kw)


def gateway(market: Marketplace, ray_address: str = "127.0.0.1:6379", ray_token: str = "") -> TestClient:
    return TestClient(Starlette(routes=provider_routes(market, ray_address=ray_address, ray_token=ray_token)))


def test_ray_start_command_describes_the_node() -> None:
    hw = hardware.detect("H100:2", cpus=8, memory=1 << 30)
    info = JoinInfo("abc", "t", "10.0.0.1:6379", 5.0, hw.ray_resources("abc"))
    cmd = ray_start_command(info, hw, temp_dir="/tmp/x", ray_bin="ray")
    assert cmd[:3] == ["ray", "start", "--address=10.0.0.1:6379"]
    assert "--num-gpus=2" in cmd and "--num-cpus=8" in cmd and "--block" in cmd and "--temp-dir=/tmp/x" in cmd
    res = json.loads(next(a for a in cmd if a.startswith("--resources="))[len("--resources="):])
    assert res == {"cocoon-node:abc": 1000.0, "gpu:H100": 2.0, "gpu:H100-80GB": 2.0}


def test_agent_registers_heartbeats_and_rejoins_after_gateway_restart() -> None:
    market = Marketplace(heartbeat_interval=0.05)
    agent = make_agent(gateway(market), "A100-40GB:1", "box-a")
    info = agent.register()
    assert market.node(info.node_id).hardware.gpu_gb == 40
    assert agent.heartbeat() == "up"
    # a restarted gateway knows nothing: the heartbeat's 404 makes the agent register again
    fresh = Marketplace(heartbeat_interval=0.05)
    agent.link = GatewayLink("http://testserver", client=gateway(fresh))
    assert agent.heartbeat() == "up"
    assert fresh.node(info.node_id).name == "box-a" and agent.info is not None and agent.info.token != info.token


def test_agent_run_loop_and_draining_leave() -> None:
    market = Marketplace(heartbeat_interval=0.05)
    agent = make_agent(gateway(market), "H100:1", "box-h")
    nid = agent.register().node_id
    req = Requirements.parse("H100")
    market.assign("f", nid, req)  # a replica the controller must move before the node may go
    seen: list[str] = []
    loop = threading.Thread(target=agent.run, kwargs={"on_status": seen.append}, daemon=True)
    loop.start()
    wait_for(lambda: "up" in seen, 5, "a first heartbeat")
    result: dict[str, str] = {}
    leaver = threading.Thread(target=lambda: result.setdefault("s", agent.leave(timeout_s=10, poll_s=0.02)))
    leaver.start()
    wait_for(lambda: market.status(nid) == "draining", 5, "draining")
    time.sleep(0.2)
    assert leaver.is_alive()  # still waiting: the replica is there
    market.unassign("f", nid)  # the controller moved it
    leaver.join(5)
    loop.join(5)
    assert result["s"] == "left" and not loop.is_alive() and "draining" in seen


def test_multinode_ray_placement_and_raylet_death() -> None:
    cluster = RayCluster()
    agents: list[NodeAgent] = []
    try:
        address = cluster.start_head()
        market = Marketplace(heartbeat_interval=0.5)
        client = gateway(market, ray_address=address, ray_token=cluster.token)
        h100 = make_agent(client, "H100:1", "sim-h100", price=3000, temp_dir=cluster.node_dir("h"),
                          object_store_memory=80_000_000, ray_args=node_ports())
        a100 = make_agent(client, "A100:1", "sim-a100", price=1000, temp_dir=cluster.node_dir("a"),
                          object_store_memory=80_000_000, ray_args=node_ports())
        agents += [h100, a100]
        loops = {}
        for n, ag in enumerate(agents):  # one at a time: two raylets starting at once starve a 2-core box
            ag.register()
            nodes = cluster.join(ag, ag.name, alive_after=2 + n)
        for ag in agents:
            loops[ag.name] = threading.Thread(target=ag.run, daemon=True)
            loops[ag.name].start()
        nodes = [n for n in nodes if n["Alive"]]
        wait_for(lambda: all(market.routable(ag.info.node_id) for ag in agents if ag.info), 10, "heartbeats")
        ids = {ag.name: ag.info.node_id for ag in agents if ag.info}
        by_pin = {r.split(":", 1)[1]: n["NodeID"] for n in nodes for r in n["Resources"]
                  if r.startswith("cocoon-node:")}
        assert set(by_pin) == set(ids.values())
        h100_res = next(n["Resources"] for n in nodes if n["NodeID"] == by_pin[ids["sim-h100"]])
        assert h100_res["gpu:H100"] == 1.0 and h100_res["GPU"] == 1.0 and "gpu:A100" not in h100_res

        # the marketplace picks the node; Ray places actors by the matching custom resources
        assert market.place(Requirements.parse("H100")).node_id == ids["sim-h100"]
        assert market.place(Requirements.parse("any")).node_id == ids["sim-a100"]  # cheaper
        pin = f"cocoon-node:{market.place(Requirements.parse('A100')).node_id}"
        placed = cluster.driver(f"""
            @ray.remote(num_cpus=0)
            class Where:
                def node(self):
                    return ray.get_runtime_context().get_node_id()
            by_gpu = [Where.options(resources={{"gpu:H100": 1}}).remote() for _ in range(1)]
            by_pin = [Where.options(resources={{"{pin}": 0.001}}).remote() for _ in range(3)]
            emit({{"gpu": ray.get([a.node.remote() for a in by_gpu]),
                   "pin": ray.get([a.node.remote() for a in by_pin])}})
        """)
        assert placed["gpu"] == [by_pin[ids["sim-h100"]]]
        assert placed["pin"] == [by_pin[ids["sim-a100"]]] * 3

        # SIGKILL the A100 node's raylet: the agent notices and stops heartbeating, routing drops it at once
        m2 = Marketplace(heartbeat_interval=60)  # learns deaths from Ray alone
        for ag in agents:
            m2.register(market.node(ag.info.node_id))  # type: ignore[union-attr]
        assert m2.sync_ray_nodes(nodes) == []
        loop = loops["sim-a100"]
        os.kill(raylet_of(a100.ray.pid), signal.SIGKILL)  # type: ignore[union-attr]
        killed_at = time.monotonic()
        loop.join(20)
        assert not loop.is_alive() and a100.status == "ray-died"
        wait_for(lambda: not market.routable(ids["sim-a100"]), 5, "the dead node to leave routing")
        assert market.place(Requirements.parse("any")).node_id == ids["sim-h100"]
        assert ids["sim-a100"] in market.sweep() or market.status(ids["sim-a100"]) == DOWN
        detected_s = time.monotonic() - killed_at
        assert detected_s < 10, detected_s
        # Ray's own view agrees, and the marketplace can learn it from ray.nodes() as well
        wait_for(lambda: by_pin[ids["sim-a100"]] in {n["NodeID"] for n in cluster.nodes() if not n["Alive"]}, 30,
                 "Ray to see the node dead")
        assert market.routable(ids["sim-h100"])
        assert m2.sync_ray_nodes(cluster.nodes()) == [ids["sim-a100"]]
        assert m2.status(ids["sim-h100"]) == "up"
    finally:
        for ag in agents:
            ag.stop()
            ag.stop_ray(timeout_s=5)
        cluster.teardown()
    assert cluster.pids() == []
