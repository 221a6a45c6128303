"""One forward pass of a mixed batch over the paged KV cache: the decode tokens of many sequences and prefill
chunks of others, flattened into one [T, hidden] matrix so every GEMM reads the weights once per step.

Per layer: fused QKV GEMM over all T tokens, rotary at each token's own position, K/V written into the pool at
each token's slot (block * block_size + offset), then attention per kind: the decode rows together through
`paged_attention_decode` (block tables), each prefill chunk through `attention_prefill` (causal, offset by the
positions already cached) over its sequence's gathered blocks. Logits are computed only for the rows that sample.

When the ops run on torch (CPU), the step takes `kernels.models.llama_torch.TorchDecoder`'s lean layer loop instead,
with attention here done by one gather of every decode row's cached positions per layer (the block tables
expanded to slot indices once per step) and one SDPA call over them.

The pools are [layers, num_blocks, block_size, Hkv, D]; allocated once, never grown.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cocoon_faas.kernels import (
    add_rms_norm,
    attention_prefill,
    cpu_gemm,
    gather_blocks,
    paged_attention_decode,
    rms_norm,
    rotary,
    swiglu,
    use_triton,
)
from cocoon_faas.kernels.models.llama_torch import TorchDecoder
from cocoon_faas.kernels.models.smollm import SmolLM


@dataclass
class PrefillChunk:
    """Rows [start, start + length) of the batch are positions [ctx - length, ctx) of one sequence."""

    start: int
    length: int
    ctx: int
    table: list[int]


@dataclass
class StepBatch:
    tokens: list[int]
    positions: list[int]
    slots: list[int]
    decode_tables: list[list[int]]  # rows [0, len(decode_tables)) are decode tokens, one per sequence
    decode_lengths: list[int]
    prefills: list[PrefillChunk]
    logit_rows: list[int]


Linear = Callable[[torch.Tensor, str], torch.Tensor]


def split_batch(batch: StepBatch, parts: int) -> list[tuple[StepBatch, list[int]]]:
    """The step's sequences dealt into at most `parts` sub-batches of about equal token counts (a sequence's rows
    stay together), each with the indices into `batch.logit_rows` of its own logit rows, in its order."""
    nd = len(batch.decode_tables)
    units: list[tuple[int, int, PrefillChunk | None]] = [(i, 1, None) for i in range(nd)]
    units += [(p.start, p.length, p) for p in batch.prefills]
    loads = [0] * parts
    dealt: list[list[tuple[int, int, PrefillChunk | None]]] = [[] for _ in range(parts)]
    for u in sorted(units, key=lambda u: -u[1]):
        k = loads.index(min(loads))
        dealt[k].append(u)
        loads[k] += u[1]
    wanted = {r: j for j, r in enumerate(batch.logit_rows)}
    out = []
    for us in dealt:
        if not us:
            continue
        sub = StepBatch([], [], [], [], [], [], [])
        order: list[int] = []
        for start, n, p in sorted(us, key=lambda u: (u[2] is not None, u[0])):  # decode rows first
            new = len(sub.tokens)
            sub.tokens += batch.tokens[start:start + n]
            sub.positions += batch.positions[start:start + n]
            sub.slots += batch.slots[start:start + n]
            if p is None:
                sub.decode_tables.append(batch.decode_tables[start])
                sub.decode_lengths.append(batch.decode_lengths[start])
            else:
                sub.prefills.append(PrefillChunk(new, n, p.ctx, p.table))
            for r in range(start, start + n):
                if r in wanted:
                    sub.logit_rows.append(new + r - start)
                    order.append(wanted[r])
        out.append((sub, order))
    return out


class PagedRunner:
    """`workers` > 1 on the torch path: each step's sequences are split into that many sub-batches run at once
    on as many threads, each with one torch thread (torch releases the GIL inside its ops). This uses the cores
    without OpenMP's per-op fork/join: at ~500 small ops per step, OpenMP's spinning workers cost more than they
    give on a box where other processes want the cores too (measured: 1 torch thread beat 2 at batch 1 and 8).
    A step of one sequence runs on one thread."""

    def __init__(self, model: SmolLM, num_blocks: int, block_size: int, linear: Linear | None = None,
                 workers: int = 1) -> None:
        c = model.config
        self.model = model
        self.block_size = block_size
        shape = (c.layers, num_blocks, block_size, c.kv_heads, c.head_dim)
        self.k = torch.zeros(shape, device=model.device, dtype=model.dtype)
        self.v = torch.zeros(shape, device=model.device, dtype=model.dtype)
        self._linear: Linear = linear or model.linear
        self._custom_linear = linear is not None
        self._decoder = TorchDecoder(model)
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers - 1, "cocoon-llm-step", initializer=torch.set_num_threads,
                                        initargs=(1,)) if self.workers > 1 else None
        self._kflat = [self.k[i].view(-1, c.kv_heads, c.head_dim) for i in range(c.layers)]
        self._vflat = [self.v[i].view(-1, c.kv_heads, c.head_dim) for i in range(c.layers)]
        self._offsets = torch.arange(block_size, device=model.device)
        # decode rows attend through the C kernel where it builds (each row over its own positions: no gather of
        # the batch's cache rows, no padding; see cpu_gemm.DecodeAttention), else one padded SDPA
        self._native_attention = (model.device.type == "cpu" and self.k.dtype == torch.float32
                                  and cpu_gemm.available()[0])

    @staticmethod
    def bytes_per_block(model: SmolLM, block_size: int) -> int:
        c = model.config
        return 2 * c.layers * block_size * c.kv_heads * c.head_dim * torch.finfo(model.dtype).bits // 8

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits [len(batch.logit_rows), vocab] in fp32."""
        if not self._custom_linear and not use_triton(self.k):
            parts = split_batch(batch, self.workers) if self._pool is not None else []
            if len(parts) < 2:
                return self._head(self._hidden(batch))
            assert self._pool is not None
            rest = [self._pool.submit(contextvars.copy_context().run, self._hidden, sub) for sub, _ in parts[1:]]
            outs = [self._hidden(parts[0][0])] + [f.result() for f in rest]
            rows = torch.empty((len(batch.logit_rows), outs[0].shape[-1]), dtype=outs[0].dtype, device=outs[0].device)
            for (_, order), o in zip(parts, outs, strict=True):
                rows[torch.tensor(order, dtype=torch.long, device=o.device)] = o
            return self._head(rows)
        m, c, w = self.model, self.model.config, self.model.w
        dev = m.device
        t = len(batch.tokens)
        ids = torch.tensor(batch.tokens, device=dev)
        pos = torch.tensor(batch.positions, device=dev)[None]
        slots = torch.tensor(batch.slots, device=dev)
        nd = len(batch.decode_tables)
        if nd:
            width = max(len(tb) for tb in batch.decode_tables)
            tables = torch.tensor([tb + [0] * (width - len(tb)) for tb in batch.decode_tables], dtype=torch.int32,
                                  device=dev)
            lengths = torch.tensor(batch.decode_lengths, dtype=torch.int32, device=dev)
            max_len = max(batch.decode_lengths)
        pre_tables = [torch.tensor([p.table], dtype=torch.int32, device=dev) for p in batch.prefills]
        heads, kv_heads, dim = c.heads, c.kv_heads, c.head_dim
        q_dim, kv_dim = heads * dim, kv_heads * dim
        h = m.embed(ids)
        x = rms_norm(h, w["0.ln_attn"], c.eps)
        for i in range(c.layers):
            qkv = self._linear(x, f"{i}.qkv")
            qk = rotary(qkv[:, :q_dim + kv_dim].view(1, t, heads + kv_heads, dim), m.cos, m.sin, pos)[0]
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, q_dim + kv_dim:].view(t, kv_heads, dim)
            kp, vp = self.k[i], self.v[i]
            kp.view(-1, kv_heads, dim)[slots] = k
            vp.view(-1, kv_heads, dim)[slots] = v
            a = torch.empty((t, heads, dim), device=dev, dtype=x.dtype)
            if nd:
                a[:nd] = paged_attention_decode(q[:nd], kp, vp, tables, lengths, max_len=max_len)
            for p, tb in zip(batch.prefills, pre_tables, strict=True):
                kk, vv = gather_blocks(kp, tb, p.ctx), gather_blocks(vp, tb, p.ctx)
                qq = q[p.start:p.start + p.length].transpose(0, 1)[None]
                a[p.start:p.start + p.length] = attention_prefill(qq, kk, vv, causal=True)[0].transpose(0, 1)
            x, h = add_rms_norm(self._linear(a.view(t, q_dim), f"{i}.o"), h, w[f"{i}.ln_ffn"], c.eps)
            f = self._linear(swiglu(self._linear(x, f"{i}.gate_up")), f"{i}.down")
            nxt = w[f"{i + 1}.ln_attn"] if i + 1 < c.layers else w["norm"]
            x, h = add_rms_norm(f, h, nxt, c.eps)
        rows = x[torch.tensor(batch.logit_rows, dtype=torch.long, device=dev)]
        return m.lm_head(rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    @torch.inference_mode()  # (per thread: the split steps run this on the pool's threads too)
    def _hidden(self, batch: StepBatch) -> torch.Tensor:
        """The final-normed hidden states of `batch.logit_rows` on the torch ops: `TorchDecoder`'s layer loop,
        attention over gathered slots."""
        m, c = self.model, self.model.config
        dev = m.device
        t = len(batch.tokens)
        heads, kv_heads, dim = c.heads, c.kv_heads, c.head_dim
        slots = torch.tensor(batch.slots, device=dev)
        nd = len(batch.decode_tables)
        if self._native_attention and self._decoder.decode_layers is not None:
            return self._hidden_native(batch, slots)
        dec_idx = dec_mask = None
        native: cpu_gemm.DecodeAttention | None = None
        if nd:
            dec_slots = self._decode_slots(batch)
            if self._native_attention:
                native = cpu_gemm.DecodeAttention(dec_slots, torch.tensor(batch.decode_lengths),
                                                  self._kflat[0].shape[0])
            else:
                longest = max(batch.decode_lengths)
                dec_idx = dec_slots[:, :longest].reshape(-1)
                if min(batch.decode_lengths) < longest:
                    lengths = torch.tensor(batch.decode_lengths, device=dev)
                    dec_mask = (torch.arange(longest, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
        chunks = []
        for p in batch.prefills:
            idx = self._table_slots(torch.tensor(p.table, device=dev)).view(-1)[:p.ctx]
            rows = torch.arange(p.length, device=dev)[:, None] + (p.ctx - p.length)
            chunks.append((p.start, p.length, idx, torch.arange(p.ctx, device=dev)[None, :] <= rows))
        kflat, vflat = self._kflat, self._vflat
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kf, vf = kflat[i], vflat[i]
            kf.index_copy_(0, slots, k)
            vf.index_copy_(0, slots, v)
            dec = None
            if native is not None:
                dec = native(q[:nd], kf, vf)
                if not chunks:
                    return dec
            elif dec_idx is not None:
                kk = kf.index_select(0, dec_idx).view(nd, -1, kv_heads, dim).transpose(1, 2)
                vv = vf.index_select(0, dec_idx).view(nd, -1, kv_heads, dim).transpose(1, 2)
                dec = F.scaled_dot_product_attention(q[:nd, :, None], kk, vv, attn_mask=dec_mask,
                                                     enable_gqa=True).reshape(nd, heads * dim)
                if not chunks:
                    return dec
            a = torch.empty((t, heads * dim), device=dev, dtype=q.dtype)
            if dec is not None:
                a[:nd] = dec
            for start, n, idx, mask in chunks:
                o = F.scaled_dot_product_attention(
                    q[start:start + n].transpose(0, 1)[None], kf.index_select(0, idx).transpose(0, 1)[None],
                    vf.index_select(0, idx).transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
                a[start:start + n] = o[0].transpose(0, 1).reshape(n, heads * dim)
            return a

        h = m.embed(torch.tensor(batch.tokens, device=dev))
        x = self._decoder.run(h, torch.tensor(batch.positions, device=dev), attend)
        return x[torch.tensor(batch.logit_rows, dtype=torch.long, device=dev)]

    def _hidden_native(self, batch: StepBatch, slots: torch.Tensor) -> torch.Tensor:
        """`_hidden` on the C kernels (quantized weights on CPU): every row of the step, decode token or prefill
        row, attends over its own list of cache slots (a prefill row at position p over its sequence's positions
        0..p), so each layer is one `cpu_gemm.DecodeLayer` call, and a row's bits depend neither on the other rows
        nor on how its prompt was split into chunks or served from the prefix cache (seeded sampling repeats), at
        any context length (the kernel tiles a chunk's rows, which share their slots: faster than torch's SDPA at
        every length measured, up to 2,900 positions)."""
        m, bs = self.model, self.block_size
        t = len(batch.tokens)
        nd = len(batch.decode_tables)
        width = max([len(tb) * bs for tb in batch.decode_tables] + [p.ctx for p in batch.prefills])
        lists = torch.zeros((t, width), dtype=torch.int64)
        lengths = [0] * t
        if nd:
            dec_slots = self._decode_slots(batch)
            lists[:nd, :dec_slots.shape[1]] = dec_slots
            lengths[:nd] = batch.decode_lengths
        for p in batch.prefills:
            lists[p.start:p.start + p.length, :p.ctx] = self._table_slots(torch.tensor(p.table)).view(-1)[:p.ctx]
            lengths[p.start:p.start + p.length] = range(p.ctx - p.length + 1, p.ctx + 1)
        kflat, vflat = self._kflat, self._vflat
        plan = cpu_gemm.DecodeAttention(lists, torch.tensor(lengths), kflat[0].shape[0], writes=slots)
        rot = self._decoder.rotary(torch.tensor(batch.positions))
        layers = self._decoder.decode_layers
        assert layers is not None
        h = m.embed(torch.tensor(batch.tokens))
        x = self._decoder.first(h)
        for i, layer in enumerate(layers):
            x = layer(h, x, rot, plan, kflat[i], vflat[i])
        return x[torch.tensor(batch.logit_rows, dtype=torch.long)]

    def _table_slots(self, tables: torch.Tensor) -> torch.Tensor:
        """Block tables [..., blocks] -> the cache slot of every position they hold, [..., blocks, block_size]."""
        return tables[..., None] * self.block_size + self._offsets

    def _decode_slots(self, batch: StepBatch) -> torch.Tensor:
        """[decode rows, widest table * block_size]: each decode row's cache slots, position by position (short
        tables padded with block 0; a row's length says how many are its own)."""
        width = max(len(tb) for tb in batch.decode_tables)
        tables = torch.tensor([tb + [0] * (width - len(tb)) for tb in batch.decode_tables], device=self.model.device)
        return self._table_slots(tables).view(len(batch.decode_tables), -1)

    def _head(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the LM head (the largest GEMM of a decode step: 49152 x 576) for the rows that sample.
        With workers, every row at once and the vocabulary split between two threads: row-splitting it would
        cost each thread nearly the whole GEMM (MKL's fp32 GEMM on this CPU costs as much for 4 rows as for 8)."""
        wt = self.model.lm_head_t
        if self._pool is None or wt is None or rows.shape[0] == 0:
            return self.model.lm_head(rows)
        x = rows.to(wt.dtype)
        half = wt.shape[1] // 2
        other = self._pool.submit(torch.mm, x, wt[:, half:])
        return torch.cat([torch.mm(x, wt[:, :half]), other.result()], dim=1).float()
