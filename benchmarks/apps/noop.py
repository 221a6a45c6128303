"""The no-op function `benchmarks/gateway.py` deploys: all cost measured is the platform's, none is the user's.

`async def`, like the Ray Serve deployment and the Starlette apps it is compared with (same code everywhere)."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, max_concurrency=64, min_replicas=1, max_replicas=1)
async def noop() -> int:
    return 0
