"""Convert a Llama-architecture GGUF file (llama.cpp's format) into plain tensors, a config and a tokenizer.

What the conversion undoes: llama.cpp stores quantized blocks (here Q4_1/Q8_0), dequantized with the `gguf`
package to fp32 exactly as transformers does; and it permutes the rows of the Q and K projections so rotary
embedding works on interleaved pairs. We invert that permutation (per head: rows [2i, 2i+1] -> [i, i + D/2]) to
get back the "rotate-half" layout of the HF checkpoint, which `kernels.rotary` implements. Projections are then
fused (Q|K|V, gate|up) so each layer runs two GEMMs fewer.

The tokenizer is GPT-2 byte-level BPE rebuilt from the file's vocabulary and merges; tokens typed CONTROL are
special. Pre-tokenization follows the file's `tokenizer.ggml.pre` ("smollm": each digit is its own piece, then
the GPT-2 split regex), as llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_CONTROL = 3


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


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) for a Llama GGUF file; meta holds the config, chat template and tokenizer JSON."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: architecture {arch!r} is not llama")

    def cfg(key, default=None):
        return _field(reader, f"llama.{key}", default)

    heads, kv_heads, layers = cfg("attention.head_count"), cfg("attention.head_count_kv"), cfg("block_count")
    raw = {}
    for t in reader.tensors:
        raw[t.name] = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    out: dict[str, torch.Tensor] = {"embed": torch.from_numpy(raw["token_embd.weight"])}
    out["norm"] = torch.from_numpy(raw["output_norm.weight"])
    if "output.weight" in raw:
        out["lm_head"] = torch.from_numpy(raw["output.weight"])
    for i in range(layers):
        p = f"blk.{i}."
        q = _unpermute(raw[p + "attn_q.weight"], heads)
        k = _unpermute(raw[p + "attn_k.weight"], kv_heads)
        out[f"{i}.qkv"] = torch.from_numpy(np.concatenate([q, k, raw[p + "attn_v.weight"]]))
        out[f"{i}.o"] = torch.from_numpy(raw[p + "attn_output.weight"])
        out[f"{i}.gate_up"] = torch.from_numpy(np.concatenate([raw[p + "ffn_gate.weight"], raw[p + "ffn_up.weight"]]))
        out[f"{i}.down"] = torch.from_numpy(raw[p + "ffn_down.weight"])
        out[f"{i}.ln_attn"] = torch.from_numpy(raw[p + "attn_norm.weight"])
        out[f"{i}.ln_ffn"] = torch.from_numpy(raw[p + "ffn_norm.weight"])
    hidden = cfg("embedding_length")
    meta = {
        "config": {
            "hidden": hidden, "intermediate": cfg("feed_forward_length"), "layers": layers, "heads": heads,
            "kv_heads": kv_heads, "head_dim": hidden // heads, "vocab": out["embed"].shape[0],
            "context": cfg("context_length"), "rope_base": float(cfg("rope.freq_base", 10000.0)),
            "eps": float(cfg("attention.layer_norm_rms_epsilon")),
            "bos_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
            "eos_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
            "name": str(_field(reader, "general.name", "")),
        },
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "tokenizer": build_tokenizer_json(reader),
    }
    return out, meta
