"""Serving benchmark (jaxinfer.bench.serving, dense_loop) and e2e breakdown at CPU sizes: the dense
baseline's greedy tokens against one-request-at-a-time decoding and the engine, the workload's
lengths and prompts, the metrics, the breakdown's step variants."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_greedy, needs_smollm2
from flax import nnx

from jaxinfer.bench import e2e_breakdown, serving
from jaxinfer.bench.dense_loop import DenseLoopConfig, DenseServingLoop
from jaxinfer.bench.e2e import TINY
from jaxinfer.models.llama import LlamaConfig, LlamaModel, decode_step_benchmark_setup

# float32 so that greedy tokens are exact across the attention paths (no bfloat16 near ties).
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
                  head_dim=16, rope_theta=1e4, dtype=jnp.float32)
# 7 requests on 3 slots (slots are reused), prompts of 9-29 tokens under a budget of 8 prompt tokens
# per step (every prompt is chunked), all sharing a 9-token prefix (two full pages of 4).
WORKLOAD = serving.ServingWorkload(
    7, serving.LogNormalLengths(2.0, 0.8, 1, 20), serving.LogNormalLengths(1.5, 0.8, 1, 9),
    max_batch_size=3, max_prefill_tokens=8, max_seq_len=48, page_size=4, dense_min_prefill_rows=4, seed=3,
)
PREFIX, SUFFIX, WORDS = list(range(1, 10)), [10, 11], list(range(12, 64))


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def requests():
    return serving.make_requests(WORKLOAD, PREFIX, SUFFIX, WORDS)


def test_lengths_are_the_documented_lognormals():
    # The docstring's medians and means (before clipping) are the parameters' exp(mu), exp(mu + s^2/2).
    full = serving.FULL
    assert round(math.exp(full.prompt.mu)) == 99 and round(math.exp(full.prompt.mu + full.prompt.sigma**2 / 2)) == 164
    assert round(math.exp(full.output.mu)) == 221 and round(math.exp(full.output.mu + full.output.sigma**2 / 2)) == 332
    a = full.prompt.sample(np.random.default_rng(0), 4000)
    assert a.min() >= 4 and a.max() <= 1000 and abs(np.median(a) / 99 - 1) < 0.1
    assert (a == full.prompt.sample(np.random.default_rng(0), 4000)).all()


@pytest.mark.parametrize("kw, name", [(dict(sigma=-1.0), "sigma"), (dict(low=0), "low"), (dict(high=0), "high")])
def test_bad_lengths_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        serving.LogNormalLengths(**(dict(mu=1.0, sigma=1.0, low=1, high=10) | kw))


def test_requests_share_the_prefix_and_are_reproducible(requests):
    rng = np.random.default_rng(WORKLOAD.seed)
    prompt_lens = WORKLOAD.prompt.sample(rng, WORKLOAD.num_requests)
    output_lens = WORKLOAD.output.sample(rng, WORKLOAD.num_requests)
    assert [len(p) for p, _ in requests] == [len(PREFIX) + n + len(SUFFIX) for n in prompt_lens]
    assert [n for _, n in requests] == output_lens.tolist()
    for prompt, _ in requests:
        assert prompt[: len(PREFIX)] == PREFIX and prompt[-len(SUFFIX) :] == SUFFIX
        assert set(prompt[len(PREFIX) : -len(SUFFIX)]) <= set(WORDS)
    assert requests == serving.make_requests(WORKLOAD, PREFIX, SUFFIX, WORDS)
    with pytest.raises(ValueError, match="max_seq_len"):
        serving.make_requests(dataclasses.replace(WORKLOAD, max_seq_len=30), PREFIX, SUFFIX, WORDS)


def test_dense_loop_gives_each_request_its_tokens_alone(model, requests):
    loop = DenseServingLoop(model, WORKLOAD.dense_config(), log=None)
    assert loop.prefill_buckets == (4, 8) and loop.num_step_programs == 3
    rids = [loop.submit(p, n) for p, n in requests]
    outputs = loop.run()
    assert outputs == {rid: dense_greedy(model, p, n, WORKLOAD.max_seq_len) for rid, (p, n) in zip(rids, requests)}
    assert loop.stats["decode_tokens"] == sum(n - 1 for _, n in requests)


def test_engine_and_dense_loop_agree_and_nothing_compiles_while_timed(model, requests):
    records = serving.run_serving(model, requests, WORKLOAD, "xla", log=None)
    assert [r["system"] for r in records] == list(serving.SYSTEMS)
    on, off, dense = records
    total = sum(n for _, n in requests)
    for r in records:
        assert r["greedy_agreement_identical"] == 1.0 and r["greedy_agreement_prefix"] == 1.0
        assert r["compiles_during_run"] == 0 and r["output_tokens"] == total
        assert r["median_ttft_ms"] > 0 and r["median_itl_ms"] > 0 and r["output_tokens_per_s"] > 0
    assert dense["vs_dense_xla"] == 1.0 and off["vs_prefix_caching_off"] == 1.0
    assert on["vs_dense_xla"] == pytest.approx(on["output_tokens_per_s"] / dense["output_tokens_per_s"])
    # The 9-token prefix holds two full pages of 4: later requests attach 8 tokens each.
    assert on["cached_tokens"] > 0 and off["cached_tokens"] == 0
    assert on["prefill_tokens_computed"] + on["cached_tokens"] == off["prefill_tokens_computed"]
    assert "prefix caching on / off" in serving.goal_lines(records)[0]
    assert "dense-xla loop" in serving.table(records)
    for r in records:  # the per-step breakdown: medians of perf_counter stamps
        assert r["steps"] > 0 and all(r[f"median_{k}_ms"] >= 0 for k in ("host_before", "wait", "host_after"))


def test_synchronous_engine_gives_the_overlapped_tokens(model, requests):
    records = serving.run_serving(model, requests, WORKLOAD, "xla", log=None,
                                  systems=(serving.SYSTEMS[0], serving.SYNC_SYSTEM))
    assert [r["greedy_agreement_identical"] for r in records] == [1.0, 1.0]
    assert "overlapped / synchronous" in serving.goal_lines(records)[-1]
    assert serving.parse_args(["--systems", "all"]).systems == serving.ALL_SYSTEMS
    assert serving.parse_args([]).systems == serving.SYSTEMS
    assert serving.parse_args(["--systems", "on,sync"]).systems == (serving.SYSTEMS[0], serving.SYNC_SYSTEM)
    assert serving.parse_args(["--workload", "both"]).workload == "both"
    with pytest.raises(SystemExit):
        serving.parse_args(["--systems", "on,cudnn"])


def test_first_divergence_is_the_first_differing_index():
    ref = {0: [1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9], 3: [1, 2]}
    got = serving.first_divergence({0: [1, 2, 3], 1: [4, 0, 6], 2: [0, 8, 9], 3: [1, 2, 5]}, ref)
    assert got == [3, 1, 0, 2]  # the last: equal up to the shorter output


def test_greedy_agreement_counts_tokens_before_the_first_difference():
    got = serving.greedy_agreement({0: [1, 2, 3], 1: [4, 5]}, {0: [1, 9, 3], 1: [4, 5]})
    assert got == {"prefix": 3 / 5, "identical": 0.5}


def test_dense_loop_config_is_checked(model):
    # Default padding: one prefill bucket, the prompt budget (the engine's default).
    loop = DenseServingLoop(model, DenseLoopConfig(max_batch_size=2, max_seq_len=16, max_prefill_tokens=8), log=None)
    assert loop.prefill_buckets == (8,) and loop.num_step_programs == 2
    with pytest.raises(ValueError, match="max_seq_len"):
        DenseServingLoop(model, DenseLoopConfig(max_seq_len=CFG.max_position_embeddings + 1), log=None)
    with pytest.raises(ValueError, match="min_prefill_rows"):
        DenseLoopConfig(min_prefill_rows=0)
    with pytest.raises(ValueError, match="implementation"):
        DenseLoopConfig(implementation="flash")


@needs_smollm2
def test_smollm2_prompts_start_with_the_default_system_prompt():
    from jaxinfer.models.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_gguf()
    requests, shared, workload = serving.chat_requests(serving.TINY, tok)
    system = f"<|im_start|>system\n{tok.default_system_prompt}<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(requests[0][0][:shared]) == system and workload == serving.TINY
    for prompt, _ in requests:
        assert prompt[:shared] == requests[0][0][:shared]
        assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert shared // serving.TINY.page_size >= 1  # a full page to share
    # The few-shot workload: the documented 501-token prefix (493 of text), max_seq_len raised to
    # hold the longest request (full size: 2512; chat keeps 2048).
    few, shared, fitted = serving.chat_requests(serving.TINY, tok, serving.FEW_SHOT_SYSTEM_PROMPT)
    assert shared == 501 and len(tok.encode(serving.FEW_SHOT_SYSTEM_PROMPT, add_special_tokens=False)) == 493
    assert tok.decode(few[0][0][:shared]).startswith("<|im_start|>system\nYou are a support assistant")
    assert fitted.max_seq_len == 560 and all(len(p) + n <= 560 for p, n in few)
    assert serving.FULL.fitted(shared, 6).max_seq_len == 2512 and serving.FULL.fitted(24, 5) is serving.FULL


def test_breakdown_variants_keep_or_skip_the_append():
    cfg = dataclasses.replace(TINY, num_layers=1)
    bench = decode_step_benchmark_setup(1, 2, 40, "xla", config=cfg, page_size=16)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlamaModel(dataclasses.replace(cfg, dtype=jnp.bfloat16),
                                                              rngs=nnx.Rngs(0))))
    before = jax.tree.map(np.asarray, bench.caches)
    full_logits = bench()
    after_full = jax.tree.map(np.asarray, bench.caches)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after_full)))
    for append, want in ((True, after_full), (False, before)):
        caches = jax.tree.map(jnp.asarray, before)
        logits, caches = e2e_breakdown.step_without_attention(graphdef, append, bench.params, caches, *bench.inputs)
        assert logits.shape == full_logits.shape and np.isfinite(np.asarray(logits)).all()
        for got, w in zip(jax.tree.leaves(caches), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(got), w)


def test_breakdown_command_at_tiny_size(tmp_path, capsys):
    assert e2e_breakdown.main(["--size", "tiny", "--layers", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "KV append" in out and "planning" in out
    records = [json.loads(line) for line in (tmp_path / e2e_breakdown.RECORDS_FILE).read_text().splitlines()]
    assert [r["backend"] for r in records] == ["dense-xla", "xla"]
    xla = records[1]
    assert xla["attention_ms"] + xla["append_ms"] + xla["rest_ms"] == pytest.approx(xla["latency_ms"])
    assert xla["plan_ms"] > 0 and xla["max_error"] < 5e-2


def test_kv_dtype_reaches_the_engine_and_not_the_dense_loop():
    fp8 = dataclasses.replace(WORKLOAD, kv_dtype="e4m3")
    assert fp8.engine_config("xla", prefix_caching=True).kv_dtype == "e4m3"
    assert WORKLOAD.engine_config("xla", prefix_caching=True).kv_dtype is None
    assert "kv_dtype" not in dataclasses.asdict(fp8.dense_config())
    assert serving.parse_args(["--kv-dtype", "e4m3"]).kv_dtype == "e4m3"


def test_command_line_sizes_reach_every_system():
    args = serving.parse_args(["--size", "full", "--max-batch-size", "256", "--max-prefill-tokens", "2048"])
    workload = serving.workload_of(args, gpu=False)
    assert (workload.max_batch_size, workload.max_prefill_tokens) == (256, 2048)
    assert workload.engine_config("xla", prefix_caching=True).max_batch_size == 256
    assert workload.dense_config().max_batch_size == 256 and workload.dense_config().max_prefill_tokens == 2048
    assert serving.workload_of(serving.parse_args([]), gpu=True) == serving.FULL
    assert serving.workload_of(serving.parse_args([]), gpu=False) == serving.TINY
    with pytest.raises(SystemExit):
        serving.parse_args(["--max-batch-size", "0"])
