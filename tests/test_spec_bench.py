"""`llmserve bench` for speculative decoding: the copy-heavy workload, and the acceptance rate in
the throughput output."""
from __future__ import annotations

import json

import pytest

from llmserve.bench.workloads import COPY_INSTRUCTION, PromptFactory, build_requests
from llmserve.cli import main
from tiny_models import byte_tokenizer, make_successor_model, successor_chain


def test_copy_workload_repeats_its_passage():
    factory = PromptFactory(byte_tokenizer(), seed=0)
    reqs = build_requests("copy", 3, factory, as_ids=False, input_len=40, output_len=30)
    for r in reqs:
        passage, _, tail = r.prompt.partition(COPY_INSTRUCTION)
        assert passage and passage.startswith(tail)  # the answer is started with the passage's first words
        assert r.output_len == 30 and r.prompt_len == factory.count(r.prompt)
    ids = build_requests("copy", 1, factory, as_ids=True, input_len=40, output_len=30)[0]
    assert isinstance(ids.prompt, list) and ids.prompt_len == len(ids.prompt)
    with pytest.raises(ValueError, match="tokenizer"):
        build_requests("copy", 1, PromptFactory(None, vocab_size=100), as_ids=True)


def test_bench_throughput_reports_the_acceptance_rate(tmp_path, capsys):
    folder = tmp_path / "cycle"
    make_successor_model(folder, successor_chain(list(b"the qck"), then=ord("t")))
    out = tmp_path / "tp.json"
    main(["bench", "throughput", "--model", str(folder), "--workload", "copy", "--num-prompts", "2",
          "--input-len", "24", "--output-len", "24", "--temperature", "0", "--num-kv-blocks", "64",
          "--speculative-config", json.dumps({"method": "ngram", "prompt_lookup_min": 1, "adaptive": False}),
          "--output-json", str(out), "--disable-tqdm", "--warmup", "0"])
    data = json.loads(out.read_text())
    assert 0 < data["spec_decode_num_accepted_tokens"] <= data["spec_decode_num_draft_tokens"]
    assert data["spec_decode_acceptance_rate"] == pytest.approx(
        data["spec_decode_num_accepted_tokens"] / data["spec_decode_num_draft_tokens"])
    assert data["spec_decode_mean_tokens_per_verify"] > 1
    assert data["engine"]["speculative_config"] == json.dumps({"method": "ngram", "prompt_lookup_min": 1, "adaptive": False})
    assert "acceptance rate" in capsys.readouterr().out


def test_server_counters_are_read_from_metrics_text():
    from llmserve.bench.spec_counters import parse_counters, spec_decode_summary

    text = ("# HELP llmserve:spec_decode_num_drafts_total Verify runs.\n"
            "# TYPE llmserve:spec_decode_num_drafts_total counter\n"
            'llmserve:spec_decode_num_drafts_total{model_name="m"} 10.0\n'
            'llmserve:spec_decode_num_draft_tokens_total{model_name="m"} 40.0\n'
            'llmserve:spec_decode_num_accepted_tokens_total{model_name="m"} 30.0\n'
            'llmserve:prefix_cache_hits_total{model_name="m"} 7.0\n')
    after = parse_counters(text)
    assert after == {"spec_decode_num_drafts": 10.0, "spec_decode_num_draft_tokens": 40.0,
                     "spec_decode_num_accepted_tokens": 30.0}
    summary = spec_decode_summary({"spec_decode_num_drafts": 2.0, "spec_decode_num_draft_tokens": 8.0,
                                   "spec_decode_num_accepted_tokens": 6.0}, after)
    assert summary["spec_decode_acceptance_rate"] == 0.75 and summary["spec_decode_mean_tokens_per_verify"] == 4.0
    assert spec_decode_summary(after, after) == {}
