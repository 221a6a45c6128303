"""A confidential deployment for tests/test_e2e_confidential.py: its code is sealed; the gateway stores only
ciphertext, so the constant below must never appear in the gateway's database."""

import os

import cocoon_faas as cocoon

CODE_MARKER = "code-marker-5c1e0b7f2d9a4e63"


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=4, min_replicas=2, max_replicas=2)
def vault(x: int) -> dict:
    if x < 0:  # lets a test kill this replica, so the controller starts a locked replacement
        os._exit(1)
    return {"x": x + 1, "tag": CODE_MARKER[:11]}
