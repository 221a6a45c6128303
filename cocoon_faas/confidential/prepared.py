"""Fresh keys made ahead of time, so a sealed call does its public-key work while the caller waits anyway.

A sealed request needs a fresh X25519 reply key and, per replica, a fresh HPKE sender context (an ephemeral key
and its Diffie-Hellman with the replica's key: RFC 9180 SetupBaseS, which depends only on the replica's public
key and the constant wrap `info`). Nothing about them depends on the request, so a daemon thread makes a few in
advance while the calling thread is blocked on the network, and each one is handed out exactly once. Nothing is
weaker than generating them inline: every request still gets its own ephemeral and reply keys, which never leave
this process. After `fork()` the child drops whatever the parent had prepared (a key must never serve two
processes), and `take_*` falls back to generating inline whenever the pool is empty.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque

from cocoon_faas.confidential import hpke

KeyPair = tuple[bytes, bytes]
Sender = tuple[bytes, hpke.Context]
_fresh_key = hpke.generate


class Prepared:
    """A small stock of reply keys and of sender contexts per recently used replica key."""

    def __init__(self, info: bytes, depth: int = 2, max_replicas: int = 16) -> None:
        self.info, self.depth, self.max_replicas = info, depth, max_replicas
        self._keys: deque[KeyPair] = deque()
        self._senders: OrderedDict[bytes, deque[Sender]] = OrderedDict()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # prepared secrets belong to the parent: drop them, start a new thread
            self._keys, self._senders, self._thread = deque(), OrderedDict(), None
            self._wake, self._lock, self._pid = threading.Event(), threading.Lock(), os.getpid()

    def take_key(self) -> KeyPair:
        self._check_fork()
        try:
            k = self._keys.popleft()
        except IndexError:
            k = _fresh_key()
        self._refill()
        return k

    def take_sender(self, pk: bytes) -> Sender:
        """(enc, context) of SetupBaseS(pk, info), used once."""
        self._check_fork()
        with self._lock:
            stock = self._senders.get(pk)
            if stock is None:
                stock = self._senders[pk] = deque()
                while len(self._senders) > self.max_replicas:
                    self._senders.popitem(last=False)
            else:
                self._senders.move_to_end(pk)
        try:
            s = stock.popleft()
        except IndexError:
            s = hpke.setup_sender(pk, self.info)
        self._refill()
        return s

    def _refill(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cocoon-prepared-keys", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        wake, keys = self._wake, self._keys
        while self._pid == os.getpid():
            wake.wait()
            wake.clear()
            while len(keys) < self.depth:
                keys.append(_fresh_key())
            with self._lock:
                todo = [(pk, stock) for pk, stock in self._senders.items() if len(stock) < self.depth]
            for pk, stock in todo:
                while len(stock) < self.depth:
                    stock.append(hpke.setup_sender(pk, self.info))
