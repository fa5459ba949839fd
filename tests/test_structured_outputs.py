"""Structured outputs (issue 11): the grammar engine (llguidance) through the batched bitmask, the
update point, n > 1, preemption, export/import, and offline errors. The server and the official
`openai` client are in test_structured_server.py."""
from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest
import torch
from server_fixtures import tiny_model_path
from tiny_models import make_llm

from llmserve.engine.request import RequestStatus
from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from llmserve.structured import GrammarError, StructuredOutputsParams
from llmserve.structured.bitmask import apply_bitmask

CANARY = "CANARY-so-5d1e"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                  "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                 "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "pet", "tags", "home"],
    "additionalProperties": False,
}


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def greedy(max_tokens: int = 120, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


# ---- parameters and the bitmask, no model --------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"json": {}, "regex": "a"}, {"choice": []}, {"choice": ["a", ""]},
                                {"regex": 3}, {"json_object": False}])
def test_exactly_one_valid_spec_is_required(kw):
    with pytest.raises(InvalidRequestError):
        StructuredOutputsParams(**kw)


def test_params_repr_shows_no_spec_and_round_trip_through_plain_data():
    p = SamplingParams(structured_outputs=so(regex=CANARY), logit_bias={7: 1.5})
    assert CANARY not in repr(p) and CANARY not in repr(p.structured_outputs) and "regex" in repr(p)
    back = SamplingParams(**dataclasses.asdict(p))
    assert back.structured_outputs.key == ("regex", CANARY) and back.logit_bias == {7: 1.5}


@pytest.mark.parametrize("bias", [{1: 101.0}, {-1: 1.0}, {1: True}, {str(i): 0.0 for i in range(1025)}])
def test_bad_logit_bias_is_refused(bias):
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_apply_bitmask_matches_a_per_token_reference():
    g = torch.Generator().manual_seed(0)
    vocab, rows = 70, torch.tensor([0, 2])  # 70 columns: the third word is partly used
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    out = logits.clone()
    apply_bitmask(out, rows, bitmask)
    for i, row in enumerate(rows.tolist()):
        for t in range(vocab):
            allowed = (int(bitmask[i, t // 32]) >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if allowed else float("-inf"))
    assert torch.equal(out[1], logits[1])  # a row without a grammar is untouched


# ---- offline, on a tiny random model ---------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return make_llm(tiny_model_path(), num_kv_blocks=256)


def gen(llm, params, prompts=("The quick brown fox",)):
    return llm.generate(list(prompts), params, use_tqdm=False)


def test_regex_choice_grammar_and_schema_outputs_match(llm):
    cases = [
        (so(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (so(choice=["Paris", "Berlin", "a b c"]), lambda t: t in ("Paris", "Berlin", "a b c")),
        (so(grammar='start: "yes" | "no" | "x" NUM\nNUM: /[0-9]{1,3}/'), lambda t: re.fullmatch(r"yes|no|x[0-9]{1,3}", t)),
        (so(grammar='root ::= "(" [a-c] [a-c]? ")"'), lambda t: re.fullmatch(r"\([a-c]{1,2}\)", t)),  # GBNF
        (so(json=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ]  # json_object (unbounded strings) is proven on the real model, in test_structured_server.py
    params = [greedy(300, structured_outputs=s) for s, _ in cases]
    params += [SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=300, structured_outputs=s) for s, _ in cases]
    outs = gen(llm, params, ["The quick brown fox"] * len(params))
    for out, (s, check) in zip(outs, cases + cases):
        for c in out.outputs:
            assert c.finish_reason == "stop", (s.kind, c.finish_reason)
            assert check(c.text), s.kind


def test_plain_requests_beside_grammar_requests_are_unchanged(llm):
    plain = greedy(24, ignore_eos=True)
    alone = gen(llm, plain)[0].outputs[0].token_ids
    mixed = gen(llm, [plain, greedy(40, structured_outputs=so(json=PERSON)), plain],
                ["The quick brown fox", "Paris is", "The quick brown fox"])
    assert mixed[0].outputs[0].token_ids == alone == mixed[2].outputs[0].token_ids


def test_a_batch_without_grammar_does_no_bitmask_work(llm, monkeypatch):
    import llmserve.structured.bitmask as bitmask

    def boom(*a, **k):
        raise AssertionError("bitmask work for a batch without grammars")

    monkeypatch.setattr(bitmask, "fill_bitmask", boom)
    monkeypatch.setattr("llmserve.sampling.sampler.apply_bitmask", boom)
    assert gen(llm, greedy(8, ignore_eos=True))[0].outputs[0].finish_reason == "length"


def test_logprobs_come_from_the_grammar_masked_distribution(llm):
    choices = ["yes", "no"]
    c = gen(llm, greedy(8, structured_outputs=so(choice=choices), logprobs=5))[0].outputs[0]
    tok = llm.get_tokenizer()
    first = c.logprobs[0]
    finite = {t for t, (lp, _) in first.items() if lp > float("-inf")}
    assert finite and all(any(ch.startswith(tok.decode([t])) for ch in choices) for t in finite)
    assert abs(sum(torch.tensor([lp for lp, _ in first.values() if lp > float("-inf")]).exp().tolist()) - 1) < 1e-3 \
        or len(finite) == len(first)  # all allowed tokens listed: their mass is the whole


def test_grammar_compiles_once_per_spec(llm):
    grammars = llm.engine.grammars
    spec = so(regex=r"[a-c]{2}\d")
    before = grammars.num_compiled
    gen(llm, [greedy(8, structured_outputs=spec), greedy(8, structured_outputs=so(regex=r"[a-c]{2}\d"))],
        ["a", "b"])
    assert grammars.num_compiled == before + 1


@pytest.mark.parametrize("spec", [so(regex="[0-9" + CANARY), so(json={"type": "nonsense", "x": CANARY}),
                                  so(grammar="start: " + CANARY + " ::= ")])
def test_an_invalid_spec_is_a_typed_error_that_quotes_nothing(llm, spec):
    with pytest.raises(GrammarError) as e:
        gen(llm, greedy(4, structured_outputs=spec))
    assert isinstance(e.value, InvalidRequestError) and spec.kind in str(e.value)
    assert CANARY not in str(e.value) and CANARY not in repr(e.value) and e.value.detail
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_spec_in_a_batch_fails_only_at_admission(llm):
    """Validation happens at add_request; the engine keeps serving afterwards."""
    with pytest.raises(GrammarError):
        gen(llm, [greedy(4), greedy(4, structured_outputs=so(regex="("))], ["a", "b"])
    assert gen(llm, greedy(4, structured_outputs=so(choice=["ok"])))[0].outputs[0].text == "ok"


def test_preemption_keeps_the_grammar_consistent(llm):
    params = [greedy(60, structured_outputs=so(json=PERSON)), greedy(40, structured_outputs=so(regex=r"[a-z ]{5,30}\."))]
    prompts = ["The quick brown fox", "Once upon a time"] * 3
    expected = [o.outputs[0].token_ids for o in gen(llm, params * 3, prompts)]
    small = make_llm(tiny_model_path(), num_kv_blocks=24, block_size=4)
    preempted = []
    orig = small.engine.scheduler.schedule

    def schedule():
        out = orig()
        preempted.extend(out.preempted)
        return out

    small.engine.scheduler.schedule = schedule
    outs = gen(small, params * 3, prompts)
    assert preempted, "the KV budget was meant to force preemptions"
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_export_and_import_replay_the_grammar(llm):
    params = SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=120, structured_outputs=so(json=PERSON))
    ids = llm.get_tokenizer().encode("Paris is")
    expected = gen(llm, params, [ids])[0]
    a, b = make_llm(tiny_model_path()), make_llm(tiny_model_path())
    a.engine.add_request("r", ids, params)
    for _ in range(6):
        a.engine.step()
    assert all(r.grammar is not None and r.num_output_tokens > 0 for r in a.engine.groups["r"].seqs)
    state = a.engine.export_request("r")
    assert all("grammar" not in s for s in state["seqs"])
    b.engine.import_request(state)
    done = None
    while b.engine.has_unfinished_requests():
        for out in b.engine.step():
            done = out if out.finished else done
    assert [c.token_ids for c in done.outputs] == [c.token_ids for c in expected.outputs]
    for c in done.outputs:
        jsonschema.validate(json.loads(c.text), PERSON)


def test_import_refuses_tokens_the_grammar_rejects(llm):
    ids = llm.get_tokenizer().encode("Paris is")
    a = make_llm(tiny_model_path())
    a.engine.add_request("r", ids, greedy(20, ignore_eos=True))
    for _ in range(4):
        a.engine.step()
    state = a.engine.export_request("r")
    state["seqs"][0]["params"]["structured_outputs"] = {"regex": "[0-9]+"}
    state["seqs"][0]["output_token_ids"] = llm.get_tokenizer().encode("abc")
    with pytest.raises(GrammarError):
        llm.engine.import_request(state)
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_the_grammar_ends_the_sequence_as_a_stop(llm):
    [out] = gen(llm, greedy(50, ignore_eos=True, structured_outputs=so(choice=["Berlin"])))
    c = out.outputs[0]
    assert (c.text, c.finish_reason, c.stop_reason) == ("Berlin", "stop", None)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
    assert RequestStatus.FINISHED_STOPPED.value == c.finish_reason


def test_logit_bias_steers_sampling(llm):
    tok = llm.get_tokenizer()
    target = tok.encode("Z")[0]
    out = gen(llm, greedy(6, ignore_eos=True, logit_bias={target: 100.0}))[0].outputs[0]
    assert out.token_ids == [target] * 6
    banned = gen(llm, greedy(6, ignore_eos=True))[0].outputs[0].token_ids[0]
    again = gen(llm, greedy(6, ignore_eos=True, logit_bias={banned: -100.0}))[0].outputs[0].token_ids
    assert banned not in again


def test_reprs_show_no_spec_or_tokens(llm):
    llm.engine.add_request("r", [5, 6, 7], greedy(4, structured_outputs=so(regex=CANARY)))
    try:
        req = llm.engine.groups["r"].seqs[0]
        for obj in (req, req.grammar, req.params, llm.engine.grammars):
            assert CANARY not in repr(obj) and "5, 6, 7" not in repr(obj)
    finally:
        llm.engine.abort_request("r")
        llm.engine.step()
