"""Bookkeeping of the paged KV cache: which blocks are free, who holds each block, which hold a cached prefix.

The pool has a fixed number of blocks of `block_size` token positions each (the tensors live in the runner);
here only block ids move. A block is in exactly one of three states:

- held: `refs > 0`, listed in one or more sequences' block tables (shared blocks have refs > 1);
- cached: `refs == 0` but its contents are a registered prefix (a full block whose key chains the keys of every
  block before it); kept in an LRU so a later request with the same prefix takes it back instead of recomputing;
- free: `refs == 0` and no contents worth keeping.

Allocation takes a free block, or else evicts the least recently released cached block. So `available()` (free
plus cached) is what admission control may promise. A block's key is a digest of its parent's key and its own
token ids: two requests share a block only when every token up to its end is the same, and the chain starts
from the same root (the engine's per-caller salt; see `Engine`).

Copy-on-write: a sequence about to write into a block it shares (refs > 1; after `n > 1` forks share the last,
partly filled prompt block) asks `writable()` for a private copy first; full prefix blocks are never written.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a full block: chains the parent's key so equal keys mean equal whole prefixes."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently released first
        self._key_of: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}
        self.evictions = 0

    # --- counts -----------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks an allocation can take now (free + evictable cached)."""
        return len(self._free) + len(self._lru)

    def free_count(self) -> int:
        return len(self._free)

    def cached_count(self) -> int:
        return len(self._lru)

    def held_count(self) -> int:
        return self.num_blocks - self.available()

    # --- life cycle -------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._lru:
            b, _ = self._lru.popitem(last=False)
            del self._by_key[self._key_of.pop(b)]
            self.evictions += 1
        else:
            raise RuntimeError("KV cache exhausted: admission control should have prevented this")
        self.refs[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.refs[b] == 0:
            self._lru.pop(b, None)
        self.refs[b] += 1

    def release(self, b: int) -> None:
        if self.refs[b] <= 0:
            raise RuntimeError(f"block {b} released more often than held")
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self._key_of:
                self._lru[b] = None
            else:
                self._free.append(b)

    def writable(self, b: int) -> tuple[int, bool]:
        """(block to write into, whether it is a fresh copy of `b` the caller must fill with b's contents)."""
        if self.refs[b] == 1 and b not in self._key_of:
            return b, False
        if self.refs[b] == 1:  # sole holder of a registered block: writing would corrupt the cached prefix
            self._unregister(b)
            return b, False
        nb = self.allocate()
        self.release(b)
        return nb, True

    # --- prefix cache -----------------------------------------------------------------------------------------
    def register(self, b: int, key: bytes) -> None:
        """Record that held block `b` holds the full block with `key` (first holder wins)."""
        if key not in self._by_key and b not in self._key_of:
            self._by_key[key] = b
            self._key_of[b] = key

    def _unregister(self, b: int) -> None:
        key = self._key_of.pop(b, None)
        if key is not None and self._by_key.get(key) == b:
            del self._by_key[key]

    def match_prefix(self, tokens: Sequence[int], limit: int, root: bytes = b"") -> tuple[list[int], list[bytes]]:
        """Take (incref) the cached blocks covering the longest run of full leading blocks of `tokens`, at most
        `limit` blocks; return them and their keys. `root` is the first block's parent key: requests with
        different roots (callers, when each has its own cache) never share a block."""
        bs = self.block_size
        blocks: list[int] = []
        keys: list[bytes] = []
        parent = root
        for i in range(min(limit, len(tokens) // bs)):
            key = block_key(parent, tokens[i * bs:(i + 1) * bs])
            b = self._by_key.get(key)
            if b is None:
                break
            self.incref(b)
            blocks.append(b)
            keys.append(key)
            parent = key
        return blocks, keys
