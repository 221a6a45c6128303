"""The torch path (CPU) of a Llama decoder step, written for the fewest torch calls per layer.

On a CPU a small model's decode step is bound by per-op overhead more than by arithmetic: SmolLM2's 30 layers at
~25 ops each cost several microseconds per op whatever the tensor size. The Triton kernels' torch references are
written for clarity (and checked against the kernels), not for that; this loop is the fast path both the
contiguous-cache `SmolLM.forward` and the paged `llm.runner.PagedRunner` take when the ops run on torch:

- the tokens of a step are one [T, hidden] matrix; each layer's weights are resolved once into a tuple (no name
  lookups per op) and each projection is a bound GEMM (fp32 `torch.mm` on the [in, out] layout; for quantized
  weights the C block GEMM of `kernels.cpu_gemm`, else torch's packed int4 GEMM);
- rotary embedding of Q and K together is one batched matmul by a per-token 2-D rotation matrix [T, D, D] built
  once per step (rotate-half is linear: y = x @ M with cos on the diagonal and +-sin on the two off-diagonals);
- residual adds run in place, RMSNorm is four small ops, SwiGLU runs in place on the gate half;
- attention is the caller's (`Attend`): it writes K and V into its cache and returns [T, heads * head_dim];
- on the C block GEMM, everything after attention is one C call per layer (`cpu_gemm.LayerTail`), rotary is the C
  kernels' own, and `decode_layers` (one C call per whole layer) serve the paged runner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import cpu_gemm

Gemm = Callable[[torch.Tensor], torch.Tensor]
# (layer, q [T, heads, D] rotated, k [T, kv_heads, D] rotated, v [T, kv_heads, D]) -> [T, heads * D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _mm(w: torch.Tensor) -> Gemm:
    return lambda x: torch.mm(x, w)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x [T, hidden] in x's dtype (fp32 on CPU)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)) * w


class TorchDecoder:
    """The decoder layers of a `SmolLM` (or any model with its `w` / `quantized` / `config` / `cos` / `sin`)."""

    def __init__(self, model) -> None:
        c = model.config
        self.config = c
        self.eps = c.eps
        self.cos, self.sin = model.cos, model.sin

        def gemm(name: str) -> Gemm:
            q = model.quantized.get(name)
            if q is None:
                return _mm(model.w[name])
            return q.cpu if q.cpu is not None else q  # torch's int4 GEMM directly, no dispatch per call

        w = model.w
        self.first_norm = w["0.ln_attn"]
        self.layers = [
            (gemm(f"{i}.qkv"), gemm(f"{i}.o"), gemm(f"{i}.gate_up"), gemm(f"{i}.down"), w[f"{i}.ln_ffn"],
             w[f"{i + 1}.ln_attn"] if i + 1 < c.layers else w["norm"])
            for i in range(c.layers)
        ]
        # quantized weights on the C block GEMM: everything after attention is one call per layer
        self.tails: list[cpu_gemm.LayerTail] | None = None
        # and a step of decode rows only is one call per layer (the paged runner's; rotary then runs in C on
        # every step, so a row gets the same bits whichever kind of step it is in)
        self.decode_layers: list[cpu_gemm.DecodeLayer] | None = None
        if all(isinstance(g, cpu_gemm.BlockLinear) for layer in self.layers for g in layer[1:4]):
            self.tails = [cpu_gemm.LayerTail(o, gu, dn, ln_ffn, ln_next, self.eps)  # type: ignore[arg-type]
                          for _, o, gu, dn, ln_ffn, ln_next in self.layers]
            if all(isinstance(layer[0], cpu_gemm.BlockLinear) for layer in self.layers):
                self.decode_layers = [
                    cpu_gemm.DecodeLayer(layer[0], tail, c.heads, c.kv_heads, c.head_dim)  # type: ignore[arg-type]
                    for layer, tail in zip(self.layers, self.tails, strict=True)]

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """[T, D, D] matrices M with x @ M = rotate-half rotary of x [D] at each position (see module docstring)."""
        c, s = self.cos[positions], self.sin[positions]  # [T, D/2]
        half = c.shape[-1]
        m = torch.diag_embed(torch.cat([c, c], dim=-1))
        ds = torch.diag_embed(s)
        m[:, half:, :half] -= ds  # y[j] = x[j] c_j - x[j + half] s_j
        m[:, :half, half:] += ds  # y[j + half] = x[j + half] c_j + x[j] s_j
        return m

    def rotary(self, positions: torch.Tensor) -> cpu_gemm.Rotary:
        """The C kernels' rotary at `positions` [T] (the C layers' own; checked once per step)."""
        return cpu_gemm.Rotary(self.cos, self.sin, positions)

    def first(self, h: torch.Tensor) -> torch.Tensor:
        """The first layer's input: RMSNorm of the embeddings h [T, hidden]."""
        return rms_norm(h, self.first_norm, self.eps)

    def run(self, h: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Hidden states h [T, hidden] (the embeddings; updated in place) through every layer at `positions` [T];
        returns the final-normed states [T, hidden]."""
        c, eps = self.config, self.eps
        t = h.shape[0]
        heads, kv_heads, dim = c.heads, c.kv_heads, c.head_dim
        qk_dim = (heads + kv_heads) * dim
        inter = c.intermediate
        tails = self.tails
        # with the C layers, their rotary (checked once here), in place
        c_rot = self.rotary(positions) if self.decode_layers is not None else None
        rot = self.rotation(positions) if c_rot is None else None
        x = self.first(h)
        for i, (qkv_mm, o_mm, gate_up_mm, down_mm, ln_ffn, ln_next) in enumerate(self.layers):
            qkv = qkv_mm(x)
            if c_rot is not None:
                c_rot(qkv, heads + kv_heads, dim)
                qk = qkv[:, :qk_dim].view(t, heads + kv_heads, dim)
            else:
                assert rot is not None
                qk = torch.bmm(qkv[:, :qk_dim].view(t, heads + kv_heads, dim), rot)
            a = attend(i, qk[:, :heads], qk[:, heads:], qkv[:, qk_dim:].view(t, kv_heads, dim))
            if tails is not None:
                x = tails[i](h, a)
                continue
            h.add_(o_mm(a))
            x = rms_norm(h, ln_ffn, eps)
            gu = gate_up_mm(x)
            g = F.silu(gu[:, :inter], inplace=True)
            h.add_(down_mm(g.mul_(gu[:, inter:])))
            x = rms_norm(h, ln_next, eps)
        return x
