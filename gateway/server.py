"""`cocoon serve`: start (or join) Ray, then run the gateway under uvicorn."""

from __future__ import annotations

import logging
from typing import Any

from cocoon_faas.settings import Settings


def init_ray(settings: Settings) -> dict[str, Any]:
    """Join `ray_address`, or start a local Ray whose processes die with the gateway."""
    import ray

    common: dict[str, Any] = {"namespace": "cocoon", "log_to_driver": False, "ignore_reinit_error": True,
                              "include_dashboard": False, "logging_level": logging.WARNING}
    # log_to_driver=False: replica output must never reach the gateway's own logs (confidential payloads).
    if settings.ray_address:
        ctx = ray.init(address=settings.ray_address, **common)
    else:
        # address="local": always a new cluster of our own. A bare ray.init() would join whatever cluster
        # /tmp/ray/ray_current_cluster (or RAY_ADDRESS) names, even a dead one left by an old `ray start`, and
        # then refuses num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided").
        ctx = ray.init(address="local", num_cpus=settings.ray_num_cpus, _node_ip_address="127.0.0.1", **common)
    info = getattr(ctx, "address_info", {})
    return {"address": info.get("gcs_address") or info.get("address")}


def serve(settings: Settings) -> None:
    import uvicorn

    from cocoon_faas.gateway.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init_ray(settings)
    app = create_app(settings)
    # No proxy-header rewriting or Server header: neither is used, and both cost on every call.
    # Bounded by settings: open connections (503 beyond), idle keep-alive, and header size (the app answers 431;
    # the h11 bound covers that parser too).
    uvicorn.run(app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, timeout_graceful_shutdown=5, proxy_headers=False,
                server_header=False, limit_concurrency=settings.max_connections, timeout_keep_alive=30,
                h11_max_incomplete_event_size=settings.max_header_bytes)
