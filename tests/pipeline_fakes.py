"""A fake Ray backend for pipeline tests: each "replica" is a real TCP server on loopback that speaks the data-path
protocol (cocoon_faas/protocol.py) and answers each call as its arguments say, so the real gateway (routes,
pipeline, chooser, controller, replica connections, billing, ledger) runs without Ray or user code.

Modes (the `mode` argument, or a chat call's last message): ok, error (the function raises), timeout (the replica
enforced the limit), hang (until cancelled), die (the replica drops its connection once per call id), slow (a
long stream, for disconnects), die_mid (a stream that dies after one item). Sealed calls are opened and answered
with a real `ReplicaIdentity` (dev attestation), as a replica does.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.confidential.replica import ReplicaIdentity

EXEC_MS = 40.0
USAGE_PROMPT = 5


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakeReplica:
    died: set[str] = set()  # call ids a replica already died on (the retry elsewhere answers)

    def __init__(self, name: str, measurement: str, kind: str, home: Path) -> None:
        self.name, self.measurement, self.kind, self.home = name, measurement, kind, home
        self.start = _Method(self._start)
        self.replica_id = ""
        self.server: asyncio.AbstractServer | None = None
        self.conns: list[P.FrameProtocol] = []
        self.waiting: dict[int, asyncio.Event] = {}
        self.ident = ReplicaIdentity.create(name, measurement, "fake", evidence="dev", home=home)

    async def _start(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return {"ok": True, "host": "127.0.0.1", "port": port, "pid": os.getpid(), "setup_s": 0.0,
                "key_id": self.ident.key_id, "document": self.ident.document, "code_locked": False}

    def _protocol(self) -> P.FrameProtocol:
        holder: dict[str, P.FrameProtocol] = {}

        def on_frame(call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
            if ftype == P.HELLO:  # the per-replica secret (runtime/replica.py checks it; a fake trusts it)
                holder["p"].send(P.encode(call, P.HELLO))
            elif ftype == P.CALL:
                asyncio.get_running_loop().create_task(self._answer(holder["p"], call, meta, body))
            elif ftype == P.CANCEL and call in self.waiting:
                self.waiting[call].set()

        proto = holder["p"] = P.FrameProtocol(on_frame)
        self.conns.append(proto)
        return proto

    def kill(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        if self.server is not None:
            self.server.close()

    async def _answer(self, conn: P.FrameProtocol, call: int, meta: dict[str, Any], body: bytes) -> None:
        try:
            await self._run(conn, call, meta, body)
        except ConnectionError:
            pass  # the gateway hung up (a cut stream, a killed replica)

    async def _run(self, conn: P.FrameProtocol, call: int, meta: dict[str, Any], body: bytes) -> None:
        await asyncio.sleep(EXEC_MS / 1000)  # honest: it reports EXEC_MS, and the gateway caps at its wall time
        sealed = bool(meta.get("sealed"))
        ctx = None
        if sealed:
            opened = self.ident.open_request(body)
            args, ctx = json.loads(opened.args_json), opened.ctx
        else:
            args = json.loads(body) if body else {}
        mode = str(args.get("mode", "ok"))
        if "messages" in args:
            mode = args["messages"][-1]["content"]
        chat = "messages" in args
        n = int(args.get("max_tokens", 3)) if chat else int(args.get("n", args.get("max_tokens", 3)))
        choices = int(args.get("n", 1)) if chat else 1  # OpenAI's n: items then name their choice
        cid = str(meta.get("id"))
        send = conn.send
        if mode == "die" or (mode == "die_first" and cid not in FakeReplica.died):
            if cid not in FakeReplica.died:
                FakeReplica.died.add(cid)
                self.kill()
                return
        if mode == "timeout":
            send(P.encode(call, P.ERROR, {"type": "timeout", "message": "time limit", "ms": EXEC_MS}))
            return
        if mode == "hang":
            ev = self.waiting[call] = asyncio.Event()
            await ev.wait()
            send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled", "ms": 1.0}))
            return
        rate, royalty = float(meta.get("rate", 0.0)), int(meta.get("royalty", 0))
        price = math.ceil(round(EXEC_MS, 3) / 1000 * rate) + royalty

        def final(kind: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"ms": EXEC_MS, "sealed": kind}
            assert ctx is not None
            tag = self.ident.gateway_tag(ctx, meta.get("gk"))
            if tag is not None:
                out["gm"] = tag
            if usage is not None:
                out["usage"] = usage
            return out

        if mode == "refuse" and not sealed:  # what a function raising cocoon's InvalidRequestError sends
            send(P.encode(call, P.ERROR, {"type": "function_error", "exc_type": "InvalidRequestError",
                                          "message": "prompt exceeds the model's context", "ms": EXEC_MS}))
            return
        if mode == "error" and not meta.get("stream"):
            if sealed:
                assert ctx is not None
                frame = self.ident.seal_error(ctx, cid, "ValueError", "boom", EXEC_MS, price)
                send(P.encode(call, P.RESULT, final("err"), frame))
            else:
                send(P.encode(call, P.ERROR, {"type": "function_error", "exc_type": "ValueError",
                                              "message": "boom", "ms": EXEC_MS}))
            return
        if not meta.get("stream"):
            result = ({"embedding": [1.0, float(len(args.get("text", "")))], "tokens": len(args.get("text", ""))}
                      if "text" in args else {"ok": True, "mode": mode})
            raw = json.dumps(result).encode()
            if sealed:
                assert ctx is not None
                send(P.encode(call, P.RESULT, final("res"), self.ident.seal_response(ctx, cid, raw, EXEC_MS, price)))
            else:
                send(P.encode(call, P.RESULT, {"ms": EXEC_MS}, raw))
            return
        items: list[dict[str, Any]]
        count = 400 if mode == "slow" else (1 if mode in ("error", "die_mid") else n)
        seq = 0
        for i in range(count):
            for c in range(choices):
                item: dict[str, Any] = {"delta": f"t{i} " if c == 0 else f"c{c}t{i} "} if chat else {"i": i}
                if choices > 1:
                    item["index"] = c
                if args.get("logprobs"):  # as examples/chat.py reports them; the alternatives a fixed ladder
                    lp = -0.25 * (i + 1)
                    item["logprobs"] = {"token": item["delta"], "logprob": lp, "top_logprobs": [
                        [item["delta"], lp], *([f"alt{k}", lp - k] for k in range(1, 6))]}
                raw = json.dumps(item).encode()
                if sealed:
                    assert ctx is not None
                    send(P.encode(call, P.CHUNK, {"seq": seq, "sealed": "chunk"},
                                  self.ident.seal_chunk(ctx, seq, raw)))
                else:
                    send(P.encode(call, P.CHUNK, {"seq": seq}, raw))
                seq += 1
            if mode == "slow":
                await asyncio.sleep(0.02)
        if mode == "die_mid":
            await asyncio.sleep(0.05)
            self.kill()
            return
        if mode == "error":
            if sealed:
                assert ctx is not None
                frame = self.ident.seal_error(ctx, cid, "ValueError", "boom", EXEC_MS, price)
                send(P.encode(call, P.END, {**final("err"), "seq": seq}, frame))
            else:
                send(P.encode(call, P.ERROR, {"type": "function_error", "exc_type": "ValueError",
                                              "message": "boom", "ms": EXEC_MS}))
            return
        usage = {"prompt_tokens": USAGE_PROMPT, "completion_tokens": count * choices} if chat else None
        items = [{"finish_reason": "stop", "usage": usage}] if chat else []
        if chat and choices > 1:
            items[0]["finish_reasons"] = ["stop"] + ["length"] * (choices - 1)
        for item in items:
            raw = json.dumps(item).encode()
            if sealed:
                assert ctx is not None
                send(P.encode(call, P.CHUNK, {"seq": seq, "sealed": "chunk"}, self.ident.seal_chunk(ctx, seq, raw)))
            else:
                send(P.encode(call, P.CHUNK, {"seq": seq}, raw))
            seq += 1
        if sealed:
            assert ctx is not None
            send(P.encode(call, P.END, {**final("end", usage), "seq": seq},
                          self.ident.seal_end(ctx, cid, EXEC_MS, price)))
        else:
            send(P.encode(call, P.END, {"ms": EXEC_MS, "seq": seq}))


class FakeBackend:
    """The controller's Ray edge, faked: replicas are FakeReplicas in the gateway's own event loop."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.replicas: list[FakeReplica] = []
        self.facts: dict[str, bytes] = {}

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 64.0, "memory": 2.0**40}

    def missing_resource(self, spec: Any) -> str | None:
        return None

    def create(self, fr: Any, forward_logs: bool, replica_id: str = "", secret: bytes = b"",
               extra_resources: Any = None) -> FakeReplica:
        r = FakeReplica(fr.name, fr.measurement, fr.spec.kind, self.home)
        r.replica_id = replica_id
        self.replicas.append(r)
        return r

    def start(self, actor: FakeReplica) -> asyncio.Task[None]:
        """Like the real backend: start fires the actor's start; its facts arrive as bytes (`read_facts`)."""
        async def run() -> None:
            self.facts[actor.replica_id] = json.dumps(await actor._start()).encode()

        return asyncio.get_running_loop().create_task(run())

    async def ended(self, ref: asyncio.Task[None], timeout: float) -> bool:
        await asyncio.wait({ref}, timeout=timeout)
        return ref.done()

    def read_facts(self, replica_id: str) -> bytes | None:
        return self.facts.pop(replica_id, None)

    def node_addresses(self) -> set[str]:
        return set()

    def kill(self, actor: Any) -> None:
        if isinstance(actor, FakeReplica):
            actor.kill()
