"""The fp8 KV agreement benchmark (jaxinfer.bench.kv_agreement): its greedy runs against one-request
dense decoding, the teacher-forced share, the per-head amax of a cache, the command line (the free-running
shares: tests/test_bench_serving.py)."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_greedy, needs_smollm2
from flax import nnx

from jaxinfer.bench import kv_agreement as ka
from jaxinfer.models.llama import LlamaConfig, LlamaModel

# float32 so that greedy tokens are exact across the attention paths (no bfloat16 near ties).
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_qo_heads=4, num_kv_heads=2,
                  head_dim=16, rope_theta=1e4, dtype=jnp.float32)
PROMPTS = [[1, 5, 9, 2], [3, 3, 7, 11, 13, 17, 19, 23, 29, 31, 2, 4, 6, 8, 10, 12, 14, 16, 18], [40]]


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, rngs=nnx.Rngs(0))


def test_greedy_runs_give_each_prompt_its_own_tokens_and_teacher_forcing_scores_them(model):
    tokens = 6
    run = ka.greedy(model, PROMPTS, tokens, "xla", "float32")
    max_seq_len = ka.engine_config(PROMPTS, tokens, "xla", "float32").max_seq_len
    assert run.outputs == {i: dense_greedy(model, p, tokens, max_seq_len) for i, p in enumerate(PROMPTS)}
    assert ka.teacher_forced(model, PROMPTS, run.outputs, "xla", "float32") == 1.0
    # Every reference token replaced: the greedy token after each (now shifted) context matches
    # its shifted next token only by chance (1 in the vocabulary's 64).
    shifted = {i: [(t + 1) % CFG.vocab_size for t in out] for i, out in run.outputs.items()}
    assert ka.teacher_forced(model, PROMPTS, shifted, "xla", "float32") <= 0.25


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cache_amax_is_each_kv_heads_largest_magnitude_over_layers(layout):
    rng = np.random.default_rng(0)
    heads = 3
    shape = (5, 4, heads, 8) if layout == "NHD" else (5, heads, 4, 8)
    caches = [tuple(jnp.asarray(rng.uniform(-1, 1, shape), jnp.bfloat16) for _ in range(2)) for _ in range(2)]
    # The largest |K| of head 1 sits in the second layer, |V| of head 2 in the first (negative).
    idx = (2, 3, 1, 5) if layout == "NHD" else (2, 1, 3, 5)
    caches[1] = (caches[1][0].at[idx].set(7.0), caches[1][1])
    idx = (0, 0, 2, 0) if layout == "NHD" else (0, 2, 0, 0)
    caches[0] = (caches[0][0], caches[0][1].at[idx].set(-9.0))
    engine = types.SimpleNamespace(config=types.SimpleNamespace(kv_layout=layout),
                                   pool=types.SimpleNamespace(caches=caches))
    k_amax, v_amax = ka.cache_amax(engine)
    assert k_amax[1] == 7.0 and v_amax[2] == 9.0
    assert len(k_amax) == len(v_amax) == heads and max(k_amax[0], k_amax[2], v_amax[0], v_amax[1]) <= 1.0


@pytest.mark.parametrize("argv, match", [(["--tokens", "0"], "--tokens"), (["--prompts", "0"], "--prompts"),
                                         (["--kv-dtypes", "bfloat16,int8"], "kv_dtype"),
                                         (["--reference", "e3m4"], "kv_dtype")])
def test_bad_command_lines_name_the_argument(argv, match, capsys):
    with pytest.raises(SystemExit):
        ka.parse_args(argv)
    assert match in capsys.readouterr().err


@needs_smollm2
def test_command_at_one_prompt(tmp_path, capsys):
    records = ka.main(["--prompts", "1", "--tokens", "2", "--kv-dtypes", "bfloat16", "--amax-scales",
                       "--backend", "xla", "--out", str(tmp_path)])
    assert [r["kv_dtype"] for r in records] == ["bfloat16", ka.AMAX_NAME]
    assert records == [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    ref, amax = records
    assert ref["greedy_agreement_prefix"] == 1.0 and ref["first_divergence"] == [2]
    # SmolLM2's K/V stay within tens (EngineConfig's docstring): scales far below 1.
    assert all(0 < s < 1 for part in amax["k_v_scales"] for s in part)
    assert np.allclose(np.asarray(amax["k_v_scales"]) * ka.FP8_MAX, ref["k_v_amax"])
    assert ka.AMAX_NAME in capsys.readouterr().out
