"""`Engine`: one model, many concurrent requests, iteration-level (continuous) batching over a paged KV cache.

A background thread runs steps. Each step (1) takes in new requests and cancellations, (2) admits waiting
requests in arrival order while the KV pool can promise every block they may need (prompt + max_tokens, per
choice) and the batch has room, (3) builds one mixed batch: one token for every decoding sequence, then chunks
of pending prompts up to the step's token budget (so a long prompt is spread over steps and never stalls the
others), (4) runs the forward pass, (5) samples, streams outputs and retires finished sequences, whose blocks go
back to the pool at once (full blocks stay cached for prefix reuse, in an LRU, until the space is needed).

Admission reserves the worst case, so a running sequence never waits for a block and nothing is preempted; a
request that could never fit is refused at submit with the numbers, and a full waiting queue refuses with
`OverloadedError` (429). Prefix reuse: at admission the prompt's full leading blocks are looked up by key
(`blocks.block_key`) and shared instead of recomputed; the count is reported as `cached_tokens`.

Prefix privacy: `cached_tokens` (and the time to the first token) would tell a caller that someone else sent the
same prefix. So by default (`prefix_sharing="caller"`) each request's key chain starts from a salt of its caller
(`replica_context.caller_tag()`, set per call by the runtime): blocks are shared only among one caller's requests
(a bot's system prompt is still shared across its users: the bot is the caller). `prefix_sharing="function"`
shares across every caller of the function, e.g. for a public system prompt; then any caller can learn whether
some other caller sent a given prefix recently (docs/security.md, "The LLM engine").

Load: the engine registers itself with `replica_context`, so a replica reports its queue, batch and KV occupancy
to the gateway's autoscaler (`load_report`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import queue
import secrets
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cocoon_faas import replica_context
from cocoon_faas.errors import InvalidRequestError, OverloadedError
from cocoon_faas.kernels import cpu_gemm
from cocoon_faas.kernels.models.smollm import SmolLM
from cocoon_faas.kernels.models.textgen import TextStream, next_token

from .blocks import BlockManager, block_key
from .grammar import Constraint, GrammarTokenizer
from .params import Completion, SamplingParams, TokenOutput, TopLogprob, Usage
from .runner import PagedRunner, PrefillChunk, StepBatch


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int  # sequences in the batch
    total_blocks: int
    free_blocks: int  # never used or released without a cached prefix
    cached_blocks: int  # released, holding a reusable prefix (evictable)
    steps: int
    prefix_hit_tokens: int
    reserved_blocks: int = 0  # not yet allocated, but promised to admitted sequences (their worst case)

    @property
    def kv_occupancy(self) -> float:
        return 1.0 - (self.free_blocks + self.cached_blocks) / self.total_blocks


class _Seq:
    def __init__(self, req: RequestHandle, index: int, tokens: list[int], stream: TextStream,
                 generator: torch.Generator, constraint: Constraint | None) -> None:
        self.req = req
        self.index = index
        self.tokens = tokens
        self.computed = 0  # positions whose K/V are in the pool
        self.blocks: list[int] = []
        self.keys: list[bytes] = []  # keys of the leading full blocks registered so far
        self.generated = 0
        self.stream = stream
        self.generator = generator
        self.constraint = constraint
        self.reserved = 0  # blocks this sequence may still allocate under its admission reservation
        self.counts: dict[int, int] = {}  # generated token -> times (presence/frequency penalties)


class RequestHandle:
    """What `Engine.submit` returns: iterate it (sync or `async for`) for `TokenOutput`s; `usage` is set when
    every choice has finished; `cancel()` stops it and frees its blocks."""

    def __init__(self, engine: Engine, rid: int, prompt: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None, root: bytes = b"") -> None:
        self._engine = engine
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.root = root  # the prefix-cache key chain's start: the caller's salt (or b"" when shared)
        self.usage: Usage | None = None
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.error: BaseException | None = None
        self._loop = loop
        self._q: queue.SimpleQueue[TokenOutput | None] = queue.SimpleQueue()
        self._aq: asyncio.Queue[TokenOutput | None] | None = asyncio.Queue() if loop is not None else None
        self._open = params.n
        self.seqs: list[_Seq] = []

    def _put(self, item: TokenOutput | None) -> None:
        if self._aq is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass
        else:
            self._q.put(item)

    def cancel(self) -> None:
        self._engine._cancel(self)

    def __iter__(self) -> Iterator[TokenOutput]:
        if self._aq is not None:
            raise RuntimeError("this request was submitted from an event loop: use `async for`")
        while True:
            item = self._q.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[TokenOutput]:
        assert self._aq is not None, "submit from inside an event loop to iterate asynchronously"
        while True:
            item = await self._aq.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self) -> Completion:
        outs = list(self)
        assert self.usage is not None
        return Completion.collect(outs, self.params.n, self.usage)


class Engine:
    """`Engine(SmolLM.load())`; `h = engine.submit(messages_or_ids, SamplingParams(max_tokens=32))`;
    `for out in h: ...` (or `async for` when submitted from a coroutine); `engine.close()`.

    kv_blocks / block_size: the pool (default: `kv_memory_mb` worth of blocks); max_seqs: sequences in the batch
    (default: the function's `max_concurrency` inside a replica, else 32); max_batch_tokens: tokens per step
    (decode tokens + prefill chunks); max_waiting: queue length before 429; prefix_sharing: "caller" (cached
    prefixes shared only among one caller's requests) or "function" (among all callers: leaks, see the module
    docstring); threads: cores for the steps (on CPU each step's sequences are split over that many threads with
    one torch thread each, see `PagedRunner`; on a GPU torch's thread count; default: leave torch's setting)."""

    def __init__(self, model: SmolLM, *, kv_blocks: int | None = None, kv_memory_mb: int = 256,
                 block_size: int = 16, max_seqs: int | None = None, max_batch_tokens: int = 256,
                 max_waiting: int = 256, prefix_cache: bool = True, prefix_sharing: str = "caller",
                 runner: PagedRunner | None = None, threads: int | None = None) -> None:
        if prefix_sharing not in ("caller", "function"):
            raise ValueError(f"prefix_sharing must be 'caller' or 'function', got {prefix_sharing!r}")
        if max_seqs is None:
            max_seqs = replica_context.max_concurrency() or 32
        self.threads = threads
        # on CPU with quantized weights on the C block GEMM, `threads` cores split each GEMM's output columns (the
        # rest of a step is small ops on one torch thread); on CPU otherwise they run a step as that many
        # sub-batches side by side (see PagedRunner), each op on one torch thread; on a GPU torch's thread count
        self._native = model.device.type == "cpu" and model.native_cpu_gemm
        self._split = model.device.type == "cpu" and runner is None and not self._native
        if kv_blocks is None:
            kv_blocks = max(8, kv_memory_mb * 2**20 // PagedRunner.bytes_per_block(model, block_size))
        self.model = model
        self.block_size = block_size
        self.blocks = BlockManager(kv_blocks, block_size)
        self.runner = runner or PagedRunner(model, kv_blocks, block_size,
                                            workers=(threads or 1) if self._split else 1)
        self.max_seqs = max_seqs
        self.max_batch_tokens = max(max_batch_tokens, max_seqs + 1)
        self.max_waiting = max_waiting
        self.prefix_cache = prefix_cache
        self.prefix_sharing = prefix_sharing
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._inbox: deque[RequestHandle] = deque()
        self._cancels: deque[RequestHandle] = deque()
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[_Seq] = []
        self._reserved = 0
        self._steps = 0
        self._prefix_hits = 0
        self._grammar: GrammarTokenizer | None = None
        self._closed = False
        # the steps run in the creator's context: a `kernels.backend(...)` choice around Engine() holds for them
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._loop,), name="cocoon-llm-engine", daemon=True)
        self._thread.start()
        replica_context.add_load_source(self)

    # --- public API -------------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[dict[str, Any]] | Sequence[int] | str,
               params: SamplingParams | None = None, caller: str | None = None) -> RequestHandle:
        """Queue one request. `caller`: whose prefix cache it may use (default: the current call's caller,
        `replica_context.caller_tag()`); ignored with prefix_sharing="function"."""
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        ctx = self.model.config.context
        if len(ids) + params.max_tokens > ctx:
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                      f"model's {ctx}-token context; shorten the prompt or lower max_tokens",
                                      param="max_tokens")
        need = self._blocks_needed(len(ids), params)
        if need > self.blocks.num_blocks:
            raise InvalidRequestError(
                f"this request may need {need} KV blocks but the cache holds {self.blocks.num_blocks}; lower "
                f"max_tokens or n (or give the engine more kv_memory_mb)", param="max_tokens")
        vocab = self.model.config.vocab
        if params.logit_bias is not None and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(f"logit_bias names token {max(params.logit_bias)}; this model's token ids go "
                                      f"from 0 to {vocab - 1}", param="logit_bias")
        if params.n > self.max_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds the engine's batch of {self.max_seqs} sequences",
                                      param="n")
        if params.constrained:
            self._grammar_tokenizer()  # build once, outside the step loop; errors surface at submit
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        h = RequestHandle(self, next(self._ids), ids, params, loop, self._root(caller))
        constraints = [self._grammar_tokenizer().constraint(params.response_format or {})
                       if params.constrained else None for _ in range(params.n)]
        h.seqs = [self._new_seq(h, i, constraints[i]) for i in range(params.n)]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) + len(self._inbox) >= self.max_waiting:
                raise OverloadedError(f"the model's queue is full ({self.max_waiting} requests waiting); retry "
                                      f"after a few seconds")
            self._inbox.append(h)
            self._lock.notify()
        return h

    def generate(self, prompt: Sequence[dict[str, Any]] | Sequence[int] | str,
                 params: SamplingParams | None = None) -> Completion:
        """Submit and wait for the whole completion (not from inside an event loop)."""
        return self.submit(prompt, params).result()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self._waiting) + len(self._inbox), len(self._running), self.blocks.num_blocks,
                               self.blocks.free_count(), self.blocks.cached_count(), self._steps,
                               self._prefix_hits, self._reserved)

    def load_report(self) -> replica_context.LoadReport:
        """What the replica reports to the gateway's autoscaler (polled by the runtime a few times a second)."""
        s = self.stats()
        used = s.total_blocks - s.free_blocks - s.cached_blocks + s.reserved_blocks
        return replica_context.LoadReport(s.waiting, s.running, self.max_seqs, s.total_blocks,
                                          min(used, s.total_blocks), self.max_waiting)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no request is queued or running (tests, shutdown)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not (self._inbox or self._waiting or self._running or self._cancels), timeout)

    def close(self) -> None:
        replica_context.remove_load_source(self)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=30)
        self.runner.close()

    # --- request set-up -----------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Sequence[dict[str, Any]] | Sequence[int] | str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.model.encode(_utf8(prompt, "prompt"))
        elif prompt and isinstance(prompt[0], dict):
            for m in prompt:  # the tokenizer takes only text that is valid UTF-8 (no lone surrogates)
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    _utf8(m["content"], "messages")
            try:
                ids = self.model.chat_template(prompt)  # type: ignore[arg-type]
            except ValueError as exc:  # e.g. a message without a string role or content
                raise InvalidRequestError(str(exc), param="messages") from None
        else:
            if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
                raise InvalidRequestError("a prompt must be text, a list of chat messages or a list of integer "
                                          "token ids", param="prompt")
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="messages")
        vocab = self.model.config.vocab
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def _root(self, caller: str | None) -> bytes:
        if self.prefix_sharing == "function":
            return b""
        tag = replica_context.caller_tag() if caller is None else caller
        return hashlib.blake2b(tag.encode(), digest_size=16, person=b"cocoon-prefix").digest() if tag else b""

    def _blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        bs = self.block_size
        per_choice = -(-(prompt_len + params.max_tokens) // bs)
        if params.n == 1:
            return per_choice
        # choices share the prompt's full blocks; each may copy the partial one and grows its own tail
        shared = prompt_len // bs
        return shared + params.n * (per_choice - shared)

    def _grammar_tokenizer(self) -> GrammarTokenizer:
        if self._grammar is None:
            c = self.model.config
            self._grammar = GrammarTokenizer(self.model.tokenizer.to_str(), c.eos_id, c.vocab)
        return self._grammar

    def _new_seq(self, h: RequestHandle, index: int, constraint: Constraint | None) -> _Seq:
        p = h.params
        # any integer seed is accepted (OpenAI's is unbounded): torch takes 64 bits, so it is taken modulo 2**64
        seed = secrets.randbits(63) if p.seed is None else (p.seed + index) % 2**64
        return _Seq(h, index, list(h.prompt), TextStream(self.model.decode, p.stop),
                    torch.Generator().manual_seed(seed), constraint)

    def _cancel(self, h: RequestHandle) -> None:
        with self._lock:
            self._cancels.append(h)
            self._lock.notify()

    # --- the step loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            # set here, in the thread that runs the steps: OpenMP's thread count is per calling thread
            torch.set_num_threads(1 if self._split or self._native else self.threads)
            if self._native:
                cpu_gemm.set_threads(self.threads)
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closed or self._inbox or self._cancels or self._waiting
                                    or self._running)
                if self._closed:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                cancels = list(self._cancels)
                self._cancels.clear()
            try:
                for h in cancels:
                    self._retire_request(h, "cancelled")
                self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a bug must not hang every caller: fail them all, loudly
                traceback.print_exc()
                failed = list({id(x.req): x.req for x in self._running}.values()) + list(self._waiting)
                for h in failed:
                    h.error = exc
                    self._retire_request(h, "error")
            finally:
                with self._lock:
                    self._lock.notify_all()
        for h in list(self._waiting) + [s.req for s in self._running]:
            h.error = RuntimeError("the engine was closed")
            self._retire_request(h, "cancelled")

    def _admit(self) -> None:
        bs = self.block_size
        while self._waiting and len(self._running) + self._waiting[0].params.n <= self.max_seqs:
            h = self._waiting[0]
            seqs = h.seqs
            limit = (len(h.prompt) - 1) // bs  # the last prompt token is always computed: it gives the logits
            blocks, keys = self.blocks.match_prefix(h.prompt, limit, h.root) if self.prefix_cache else ([], [])
            need = self._blocks_needed(len(h.prompt), h.params) - len(blocks)
            if need > self.blocks.available() - self._reserved:
                for b in blocks:
                    self.blocks.release(b)
                return
            self._waiting.popleft()
            self._reserved += need
            first = seqs[0]
            first.blocks, first.keys = list(blocks), list(keys)
            first.computed = len(blocks) * bs
            first.reserved = need
            h.cached_tokens = first.computed
            self._prefix_hits += first.computed
            self._running.append(first)  # choices 1..n-1 fork from it once the prompt is computed

    def _step(self) -> None:
        budget = self.max_batch_tokens
        decodes = [s for s in self._running if len(s.tokens) - s.computed == 1 and s.generated > 0]
        prefills = [s for s in self._running if s.generated == 0]
        batch = StepBatch([], [], [], [], [], [], [])
        sampling: list[_Seq] = []
        for s in decodes:
            self._append_rows(s, 1, batch)
            batch.decode_tables.append(s.blocks)
            batch.decode_lengths.append(s.computed)
            batch.logit_rows.append(len(batch.tokens) - 1)
            sampling.append(s)
        budget -= len(decodes)
        for s in prefills:
            if budget <= 0:
                break
            n = min(len(s.tokens) - s.computed, budget)
            start = len(batch.tokens)
            self._append_rows(s, n, batch)
            batch.prefills.append(PrefillChunk(start, n, s.computed, s.blocks))
            budget -= n
            if s.computed == len(s.tokens):
                batch.logit_rows.append(len(batch.tokens) - 1)
                sampling.append(s)
        if not batch.tokens:
            return
        logits = self.runner.forward(batch)
        self._steps += 1
        for row, s in enumerate(sampling):
            if s.generated == 0 and s.req.params.n > 1 and s.index == 0:
                self._fork(s)
                for child in s.req.seqs[1:]:
                    self._sample(child, logits[row])
            self._sample(s, logits[row])
        for s in list(self._running):
            self._register_full_blocks(s)

    def _append_rows(self, s: _Seq, n: int, batch: StepBatch) -> None:
        """Queue positions [computed, computed + n) of `s`, allocating (or copying on write) blocks as needed."""
        bs = self.block_size
        for p in range(s.computed, s.computed + n):
            j = p // bs
            if j == len(s.blocks):
                s.blocks.append(self.blocks.allocate())
                s.reserved -= 1
                self._reserved -= 1
            elif p % bs == 0 or p == s.computed:
                b, fresh = self.blocks.writable(s.blocks[j])
                if fresh:
                    self.runner.copy_block(s.blocks[j], b)
                    s.blocks[j] = b
                    s.reserved -= 1
                    self._reserved -= 1
            batch.tokens.append(s.tokens[p])
            batch.positions.append(p)
            batch.slots.append(s.blocks[j] * bs + p % bs)
        s.computed += n

    def _fork(self, parent: _Seq) -> None:
        """Choices 1..n-1 start from the parent's computed prompt, sharing its blocks (copy-on-write)."""
        bs = self.block_size
        prompt = len(parent.req.prompt)
        share = -(-(prompt + parent.req.params.max_tokens) // bs) - prompt // bs  # see _blocks_needed
        for child in parent.req.seqs[1:]:
            child.computed = parent.computed
            child.blocks = list(parent.blocks)
            child.keys = list(parent.keys)
            for b in child.blocks:
                self.blocks.incref(b)
            child.reserved = share
            parent.reserved -= share
            self._running.append(child)

    def _sample(self, s: _Seq, row: torch.Tensor) -> None:
        p = s.req.params
        logits = row.clone() if p.adjusted else row
        if p.penalized and s.counts:  # OpenAI's penalties, on this choice's generated tokens (as vLLM does)
            ids = torch.tensor(list(s.counts), device=row.device)
            times = torch.tensor(list(s.counts.values()), dtype=row.dtype, device=row.device)
            logits[ids] -= p.frequency_penalty * times + p.presence_penalty
        if p.logit_bias is not None:
            ids = torch.tensor(list(p.logit_bias), device=row.device)
            logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
        if s.constraint is not None:
            logits = s.constraint.mask(logits)
        tok = next_token(logits, p.temperature, p.top_p, s.generator)
        if p.penalized:
            s.counts[tok] = s.counts.get(tok, 0) + 1
        logprob: float | None = None
        top: tuple[TopLogprob, ...] = ()
        if p.logprobs:
            lp = torch.log_softmax(row.float(), -1)
            logprob = float(lp[tok])
            if p.top_logprobs:
                vals, idx = torch.topk(lp, p.top_logprobs)
                top = tuple(TopLogprob(int(i), self.model.decode([int(i)]), float(v))
                            for v, i in zip(vals.tolist(), idx.tolist(), strict=True))
        s.generated += 1
        s.req.completion_tokens += 1
        if tok in self.model.stop_ids:
            s.req._put(TokenOutput(s.index, tok, s.stream.flush(), logprob, top))
            self._finish(s, "stop")
            return
        if s.constraint is not None:
            s.constraint.advance(tok)
        s.tokens.append(tok)
        piece = s.stream.push(tok)
        s.req._put(TokenOutput(s.index, tok, piece, logprob, top))
        if s.stream.stopped:
            self._finish(s, "stop")
        elif s.generated >= p.max_tokens:
            s.req._put(TokenOutput(s.index, None, s.stream.flush()))
            self._finish(s, "length")

    def _register_full_blocks(self, s: _Seq) -> None:
        if not self.prefix_cache:
            return
        bs = self.block_size
        while len(s.keys) < s.computed // bs:
            j = len(s.keys)
            key = block_key(s.keys[-1] if s.keys else s.req.root, s.tokens[j * bs:(j + 1) * bs])
            self.blocks.register(s.blocks[j], key)
            s.keys.append(key)

    def _finish(self, s: _Seq, reason: str) -> None:
        if s not in self._running:
            return
        self._running.remove(s)
        self._register_full_blocks(s)
        for b in s.blocks:
            self.blocks.release(b)
        s.blocks = []
        self._reserved -= s.reserved
        s.reserved = 0
        s.req._put(TokenOutput(s.index, None, "", finish_reason=reason))
        s.req._open -= 1
        if s.req._open == 0:
            self._done(s.req)

    def _done(self, h: RequestHandle) -> None:
        h.usage = Usage(len(h.prompt), h.completion_tokens, h.cached_tokens)
        h._put(None)

    def _retire_request(self, h: RequestHandle, reason: str) -> None:
        if h in self._waiting:
            self._waiting.remove(h)
            h._open = 0
            self._done(h)
            return
        for s in h.seqs:
            if s in self._running:
                self._finish(s, reason)
            elif s.generated == 0 and s.index > 0 and h._open > 0 and s.blocks == []:
                # a choice not yet forked from its parent: nothing held
                s.req._put(TokenOutput(s.index, None, "", finish_reason=reason))
                h._open -= 1
                if h._open == 0:
                    self._done(h)


def _utf8(text: str, param: str) -> str:
    """`text`, or a clear refusal when it cannot be UTF-8 (a lone surrogate such as '\\ud800', e.g. from a broken
    JSON escape): the tokenizer would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{param} is not valid Unicode text: {text[exc.start:exc.end]!a} at character "
                                  f"{exc.start} (a lone surrogate); send UTF-8 text", param=param) from None
    return text
