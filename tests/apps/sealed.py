"""Functions for the confidential end-to-end tests (tests/test_e2e_confidential.py)."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=8, min_replicas=1, max_replicas=1)
def shout(text: str) -> dict:
    """Prints its input (a confidential call's output must never reach the gateway) and answers a transform of
    it, so the answer holds a string the request does not."""
    print(f"shouting {text}")
    return {"shout": text.upper()[::-1], "n": len(text)}


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=4, min_replicas=1, max_replicas=1)
def spell(text: str):
    for ch in text.upper()[::-1]:
        yield {"c": ch}


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=4, min_replicas=1, max_replicas=1)
def refuse(text: str) -> dict:
    raise ValueError(f"cannot accept {text.upper()[::-1]}")


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=4, min_replicas=2, max_replicas=2)
def pair(x: int) -> int:
    return x * 2
