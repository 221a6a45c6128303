"""Convert a Llama-architecture GGUF file (llama.cpp's format) into plain tensors, a config and a tokenizer.

What the conversion keeps and undoes: block-quantized tensors (here Q4_1 projections and a Q8_0 embedding) stay
quantized, repacked into `kernels.quant.QuantWeight` planes (`name.qs`, `name.d`, `name.m`); other tensors are
dequantized with the `gguf` package to fp32 as transformers does. llama.cpp permutes the rows of the Q and K
projections so rotary embedding works on interleaved pairs; we invert that permutation (per head: rows [2i, 2i+1]
-> [i, i + D/2]) to get back the "rotate-half" layout of the HF checkpoint, which `kernels.rotary` implements.
Rows move whole, so the permutation applies to quantized blocks unchanged. Projections are then fused (Q|K|V,
gate|up; quantized ones when they share a format) so each layer runs two GEMMs fewer.

The tokenizer is GPT-2 byte-level BPE rebuilt from the file's vocabulary and merges; tokens typed CONTROL are
special. Pre-tokenization follows the file's `tokenizer.ggml.pre` ("smollm": each digit is its own piece, then
the GPT-2 split regex), as llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..quant import QuantWeight, cat_rows, dequantize, from_gguf

_CONTROL = 3
Weight = torch.Tensor | QuantWeight


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def build_tokenizer_json(reader) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok.to_str()


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def _permuted(w: Weight, index: np.ndarray) -> Weight:
    idx = torch.from_numpy(index)
    return w.rows(idx) if isinstance(w, QuantWeight) else w[idx]


def _fused(parts: list[Weight]) -> Weight:
    """Stack along the output rows: still quantized when every part has one format, else fp32."""
    if all(isinstance(p, QuantWeight) for p in parts) and len({p.fmt for p in parts}) == 1:  # type: ignore[union-attr]
        return cat_rows(parts)  # type: ignore[arg-type]
    return torch.cat([dequantize(p) if isinstance(p, QuantWeight) else p for p in parts])


def flatten(weights: dict[str, Weight]) -> dict[str, torch.Tensor]:
    """Plain tensors for a safetensors file (quantized weights as their planes); `unflatten` inverts it."""
    out: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        out.update(v.named(k) if isinstance(v, QuantWeight) else {k: v})
    return out


def unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, Weight]:
    out: dict[str, Weight] = {}
    for k, v in tensors.items():
        if k.endswith(".qs"):
            out[k[:-3]] = QuantWeight.from_named(tensors, k[:-3])
        elif not k.endswith((".d", ".m")) or f"{k[:-2]}.qs" not in tensors:
            out[k] = v
    return out


def convert_gguf(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) for a Llama GGUF file; meta holds the config, chat template and tokenizer JSON. Quantized
    weights come flattened (see `flatten`)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: architecture {arch!r} is not llama")

    def cfg(key, default=None):
        return _field(reader, f"llama.{key}", default)

    heads, kv_heads, layers = cfg("attention.head_count"), cfg("attention.head_count_kv"), cfg("block_count")
    raw: dict[str, Weight] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("Q8_0", "Q4_0", "Q4_1"):
            raw[t.name] = from_gguf(kind, t.data)
        else:
            raw[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    out: dict[str, Weight] = {"embed": raw["token_embd.weight"]}
    out["norm"] = raw["output_norm.weight"]
    if "output.weight" in raw:
        out["lm_head"] = raw["output.weight"]
    for i in range(layers):
        p = f"blk.{i}."
        q, k = raw[p + "attn_q.weight"], raw[p + "attn_k.weight"]
        q = _permuted(q, _unpermute_rows(q.shape[0], heads))
        k = _permuted(k, _unpermute_rows(k.shape[0], kv_heads))
        out[f"{i}.qkv"] = _fused([q, k, raw[p + "attn_v.weight"]])
        out[f"{i}.o"] = raw[p + "attn_output.weight"]
        out[f"{i}.gate_up"] = _fused([raw[p + "ffn_gate.weight"], raw[p + "ffn_up.weight"]])
        out[f"{i}.down"] = raw[p + "ffn_down.weight"]
        out[f"{i}.ln_attn"] = raw[p + "attn_norm.weight"]
        out[f"{i}.ln_ffn"] = raw[p + "ffn_norm.weight"]
    hidden = cfg("embedding_length")
    meta = {
        "config": {
            "hidden": hidden, "intermediate": cfg("feed_forward_length"), "layers": layers, "heads": heads,
            "kv_heads": kv_heads, "head_dim": hidden // heads, "vocab": int(out["embed"].shape[0]),
            "context": cfg("context_length"), "rope_base": float(cfg("rope.freq_base", 10000.0)),
            "eps": float(cfg("attention.layer_norm_rms_epsilon")),
            "bos_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
            "eos_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
            "name": str(_field(reader, "general.name", "")),
        },
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "tokenizer": build_tokenizer_json(reader),
    }
    return flatten(out), meta
