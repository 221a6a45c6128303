"""Keys made ahead for sealed calls: each handed out once, valid, and never shared with a forked child."""

from __future__ import annotations

import os
import time

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.prepared import Prepared


def _wait_stocked(p: Prepared, pk: bytes | None = None, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(p._keys) >= p.depth and (pk is None or len(p._senders.get(pk, ())) >= p.depth):
            return
        time.sleep(0.01)
    raise AssertionError("the pool was not refilled")


def test_keys_and_senders_are_fresh_and_used_once():
    p = Prepared(b"info", depth=3)
    sk_r, pk_r = hpke.generate()
    seen_keys, seen_enc = set(), set()
    for _ in range(12):
        sk, pk = p.take_key()
        assert hpke.generate_public(sk) == pk and sk not in seen_keys
        seen_keys.add(sk)
        enc, ctx = p.take_sender(pk_r)
        assert enc not in seen_enc
        seen_enc.add(enc)
        ct = ctx.seal(b"aad", b"msg")
        assert hpke.setup_receiver(enc, sk_r, b"info").open(b"aad", ct) == b"msg"  # a real context to pk_r
    _wait_stocked(p, pk_r)
    assert len(p._keys) == 3 and len(p._senders[pk_r]) == 3


def test_a_forked_child_drops_what_the_parent_prepared():
    p = Prepared(b"info", depth=2)
    _, pk_r = hpke.generate()
    p.take_key()
    p.take_sender(pk_r)
    _wait_stocked(p, pk_r)
    parent_stock = {k for k, _ in p._keys} | {e for e, _ in p._senders[pk_r]}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: everything it takes must be new
        try:
            got = {p.take_key()[0], p.take_sender(pk_r)[0]}
            os.write(w, b"ok" if not (got & parent_stock) and len(p._keys) <= 2 else b"reused")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 16) == b"ok"
    os.close(r)
