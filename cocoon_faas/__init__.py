"""Cocoon FaaS: confidential, pay-per-call AI functions.

    import cocoon_faas as cocoon

    @cocoon.function(cpu=1, timeout=30)
    def greet(name: str) -> dict:
        return {"hello": name}
"""

from cocoon_faas.errors import CocoonError

__all__ = ["CocoonError"]
