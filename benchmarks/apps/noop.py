"""The no-op function `benchmarks/gateway.py` deploys: all cost measured is the platform's, none is the user's."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, max_concurrency=64, min_replicas=1, max_replicas=1)
def noop() -> int:
    return 0
