"""Serving engine on an fp8 KV cache: config and names, scales that change without recompiling,
and SmolLM2's greedy tokens with an e4m3 cache against a bf16 one. (The logits of fp8 steps
against a float64 forward on the dequantized cache values: tests/nn/test_nn.py.)"""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_smollm2
from flax import nnx

from jaxinfer.models.llama import LlamaConfig, LlamaModel
from jaxinfer.serve import EngineConfig, ServingEngine, serve_step

CFG = LlamaConfig(
    vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=1, num_qo_heads=4, num_kv_heads=2,
    head_dim=8, rope_theta=1e4, dtype=jnp.float32,
)
ENGINE = dict(num_pages=16, page_size=4, max_seq_len=32, max_batch_size=2, max_prefill_tokens=8, backend="xla",
              cascade_min_saved_bytes=1)  # cascade levels in the steps that share pages


def run(engine, prompts, max_new_tokens):
    rids = [engine.submit(p, max_new_tokens) for p in prompts]
    out = engine.run()
    return [out[r] for r in rids]


@pytest.mark.parametrize("name, dtype", [("e4m3", jnp.float8_e4m3fn), ("float8_e4m3fn", jnp.float8_e4m3fn),
                                         ("e5m2", jnp.float8_e5m2), (jnp.float8_e5m2, jnp.float8_e5m2),
                                         ("bf16", jnp.bfloat16)])
def test_kv_dtype_names(name, dtype):
    engine = ServingEngine(LlamaModel(CFG, rngs=nnx.Rngs(0)), EngineConfig(**ENGINE, kv_dtype=name), log=None)
    assert engine.pool.dtype == dtype and engine.pool.caches[0][0].dtype == dtype
    assert (engine.pool.k_scale is None) == (dtype == jnp.bfloat16)


def test_bad_kv_dtype_and_scales_raise():
    for kw, name in ((dict(kv_dtype="e4m4"), "kv_dtype"), (dict(kv_dtype="float8_e4m3fnuz"), "kv_dtype"),
                     (dict(kv_dtype="int8"), "kv_dtype"), (dict(k_scale=0.0), "k_scale"),
                     (dict(v_scale=float("nan")), "v_scale"), (dict(k_scale="1"), "k_scale"),
                     (dict(kv_dtype="e5m2", v_scale=(1.0, -2.0)), "v_scale"), (dict(k_scale=True), "k_scale"),
                     (dict(k_scale=0.5), "k_scale"), (dict(kv_dtype="bf16", v_scale=(1.0, 2.0)), "v_scale")):
        with pytest.raises(ValueError, match=name):
            EngineConfig(num_pages=4, **kw)
    assert EngineConfig(num_pages=4, kv_dtype="bf16", k_scale=1.0).k_scale == 1.0
    with pytest.raises(ValueError, match="k_scale"):  # 3 scales for 2 KV heads
        ServingEngine(LlamaModel(CFG, rngs=nnx.Rngs(0)),
                      EngineConfig(**ENGINE, kv_dtype="e4m3", k_scale=(1.0, 1.0, 1.0)), log=None)


def test_scales_change_without_recompiling():
    # One engine warms the step programs; another with other scales (per tensor -> per KV head)
    # compiles nothing. Then the scales reach the cache: a prompt's keys and values, divided by
    # the scales, match those of unit scales to an fp8 rounding.
    model = LlamaModel(CFG, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (11, 6)]
    log = io.StringIO()
    config = EngineConfig(**ENGINE, kv_dtype="e4m3", prefix_caching=False)
    first = ServingEngine(model, config, log=log)
    assert "float8_e4m3fn, k_scale=1.0, v_scale=1.0" in log.getvalue()
    run(first, prompts, 4)
    before = serve_step._cache_size()
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    k_scale, v_scale = (4.0, 0.5), 0.25
    scaled = dataclasses.replace(config, k_scale=k_scale, v_scale=v_scale)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        tokens = run(ServingEngine(model, scaled, log=None), prompts, 4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and serve_step._cache_size() == before
    assert all(0 <= t < CFG.vocab_size for out in tokens for t in out)

    def prompt_kv(config):
        # One token to generate: only the prompt's keys and values are cached, in pages 0..2.
        engine = ServingEngine(model, config, log=None)
        run(engine, prompts[:1], 1)
        return [np.asarray(c[:3].astype(jnp.float32)).reshape(-1, CFG.num_kv_heads, CFG.head_dim)[:11]
                for c in engine.pool.caches[0]]

    (k1, v1), (k2, v2) = prompt_kv(config), prompt_kv(scaled)
    assert np.abs(k1).min(axis=(0, 2)).max() > 0  # written
    smallest = float(jnp.finfo(jnp.float8_e4m3fn).smallest_normal)  # below it, e4m3 steps are absolute
    np.testing.assert_allclose(k2 * np.asarray(k_scale)[:, None], k1, rtol=2**-3, atol=smallest * 4)
    np.testing.assert_allclose(v2 * v_scale, v1, rtol=2**-3, atol=smallest)


@needs_smollm2
@pytest.mark.parametrize("dtype, backend", [("float32", "xla"),
                                            pytest.param("bfloat16", "auto", marks=pytest.mark.gpu)])
def test_smollm2_greedy_tokens_e4m3_cache_agree_with_bf16_cache(capsys, dtype, backend):
    # Unit scales (SmolLM2's K/V after RMSNorm stay far inside e4m3's +-448). The agreement is the
    # share of generated tokens before each prompt's first divergence; the figure is printed.
    # On a GPU, "auto" serves the e4m3 cache with the Pallas kernels.
    from jaxinfer.models.tokenizer import ChatTokenizer

    model = LlamaModel.from_gguf(None, dtype=jnp.dtype(dtype))
    tokenizer = ChatTokenizer.from_gguf(None)
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
             "The three primary colors are"]
    prompts = [tokenizer.encode(t) for t in texts]
    n = 10
    outputs = {}
    for kv_dtype in ("bfloat16", "e4m3"):
        config = EngineConfig(num_pages=8, page_size=16, max_seq_len=32, max_batch_size=len(prompts),
                              max_prefill_tokens=sum(map(len, prompts)), backend=backend, kv_dtype=kv_dtype,
                              prefix_caching=False)
        outputs[kv_dtype] = run(ServingEngine(model, config, log=None), prompts, n)
    agreed = []
    for a, b in zip(outputs["bfloat16"], outputs["e4m3"]):
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n)
        agreed.append(diverge)
    share = sum(agreed) / (n * len(prompts))
    with capsys.disabled():
        print(f"\nSmolLM2 greedy ({dtype} model, backend {backend}), e4m3 vs bf16 KV cache: {sum(agreed)}/"
              f"{n * len(prompts)} tokens agree before the first divergence ({share:.0%}); per prompt {agreed}")
    assert share >= 0.5, (outputs, agreed)
