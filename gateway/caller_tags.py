"""The opaque caller tag sent to the replica with each call (the function reads it as
`cocoon_faas.replica_context.caller_tag()`; `llm.Engine` salts its prefix cache with it).

A tag is a keyed hash of (function, caller), where the caller is the developer behind the API key or the paying
channel: never the key or the channel themselves. Keyed with a secret of this gateway's home, so a function's
code cannot test guesses (channel addresses are public on chain), and per function, so two functions cannot
match their callers. Gateways on other machines (another COCOON_HOME) give the same caller another tag: the
prefix cache is then shared per caller per gateway, which costs cache hits, never privacy.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

KEY_FILE = "caller_tag.key"


class CallerTags:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the caller-tag key must be at least 16 bytes")
        self._key = key[:64]

    @classmethod
    def load(cls, home: Path) -> CallerTags:
        """The key in `home` (created on first use, readable by this user only; gateways of one home share it)."""
        path = home / KEY_FILE
        if not path.exists():  # written whole, then linked into place: a concurrent reader never sees half a key
            tmp = home / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another gateway of this home made it first: use theirs
            finally:
                tmp.unlink()
        key = path.read_bytes()
        if len(key) < 16:
            raise RuntimeError(f"{path} holds {len(key)} bytes, not a key; delete it and restart the gateway "
                               "(callers' prefix caches start cold again)")
        return cls(key)

    def tag(self, function: str, caller: str) -> str:
        h = hashlib.blake2b(key=self._key, digest_size=16, person=b"cocoon-caller")
        h.update(function.encode() + b"\0" + caller.encode())
        return h.hexdigest()


__all__ = ["CallerTags"]
