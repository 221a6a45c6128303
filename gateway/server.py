"""`cocoon serve`: check the sandbox, start (or join) Ray, then run the gateway under uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from cocoon_faas.settings import Settings

log = logging.getLogger("cocoon.server")


def check_sandbox(settings: Settings) -> None:
    """Refuse to run tenant code without bubblewrap, unless COCOON_SANDBOX=off (then warn loudly)."""
    from cocoon_faas.runtime.sandbox import INSECURE_WARNING, bwrap_problem

    if settings.sandbox == "off":
        banner = "!" * 100
        print(f"{banner}\nWARNING: {INSECURE_WARNING}\n{banner}", file=sys.stderr, flush=True)
        return
    problem = bwrap_problem()
    if problem is not None:
        from cocoon_faas.runtime.sandbox import SandboxUnavailable

        raise SandboxUnavailable(f"cannot sandbox tenant code: {problem}")


def init_ray(settings: Settings) -> dict[str, Any]:
    """Join `ray_address`, or start a local Ray whose processes die with the gateway."""
    common: dict[str, Any] = {"namespace": "cocoon", "log_to_driver": False, "ignore_reinit_error": True,
                              "include_dashboard": False, "logging_level": logging.WARNING}
    # log_to_driver=False: replica output must never reach the gateway's own logs (confidential payloads).
    if settings.ray_address:
        import ray

        ctx = ray.init(address=settings.ray_address, **common)
    else:
        # The embedded default listens on loopback only. Ray turns `_node_ip_address="127.0.0.1"` into the
        # machine's outside address (and then binds its gRPC servers to every interface) unless it is told this
        # node is not part of a multi-machine cluster; read at import, and inherited by the raylet and workers.
        # Provider nodes cannot join such a head (`ray start` rewrites 127.0.0.1 to the machine's address), so
        # a gateway that admits providers sets COCOON_RAY_LOOPBACK_ONLY=false.
        if settings.ray_loopback_only:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray
        from ray._private import ray_constants

        if settings.ray_loopback_only:
            ray_constants.ENABLE_RAY_CLUSTER = False  # when ray was imported before the variable was set

        # address="local": always a new cluster of our own. A bare ray.init() would join whatever cluster
        # /tmp/ray/ray_current_cluster (or RAY_ADDRESS) names, even a dead one left by an old `ray start`, and
        # then refuses num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided").
        # worker_niceness=0: Ray starts workers at nice 15 so that they yield to its own daemons; our workers are
        # the replicas, and every sandbox child they start inherits it. At nice 15 a replica gets ~1/28 of a core
        # beside one busy process at nice 0: on a loaded node calls and deploys took 5-10x longer.
        ctx = ray.init(address="local", num_cpus=settings.ray_num_cpus, _node_ip_address="127.0.0.1",
                       _system_config={"worker_niceness": 0}, **common)
    info = getattr(ctx, "address_info", {})
    return {"address": info.get("gcs_address") or info.get("address")}


def worker_app() -> Any:
    """One of `cocoon serve --workers N`'s gateway processes: joins the Ray the parent started."""
    from cocoon_faas.gateway.app import create_app
    from cocoon_faas.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    init_ray(settings)
    return create_app(settings)


def serve(settings: Settings) -> None:
    import uvicorn

    from cocoon_faas.gateway.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_sandbox(settings)
    info = init_ray(settings)
    # No proxy-header rewriting or Server header: neither is used, and both cost on every call.
    # Bounded by settings: open connections (503 beyond), idle keep-alive, and header size (the app answers 431;
    # the h11 bound covers that parser too).
    common: dict[str, Any] = dict(host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                                  log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                  proxy_headers=False, server_header=False, limit_concurrency=settings.max_connections,
                                  timeout_keep_alive=30, h11_max_incomplete_event_size=settings.max_header_bytes)
    if settings.workers > 1:
        # N gateway processes on one listening socket, sharing this Ray (started here, so it lives as long as
        # this supervisor) and the database: the same coordination as gateways on several machines
        os.environ["COCOON_RAY_ADDRESS"] = str(info["address"])
        os.environ["COCOON_WORKERS"] = str(settings.workers)
        uvicorn.run("cocoon_faas.gateway.server:worker_app", factory=True, workers=settings.workers, **common)
        return
    uvicorn.run(create_app(settings), **common)
