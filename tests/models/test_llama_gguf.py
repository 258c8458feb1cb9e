"""SmolLM2-135M-Instruct from its GGUF on jaxinfer: logits against a float64 numpy forward, tokenizer,
chat template.

The reference (llama_ref64.py) runs the dequantized tensors as llama.cpp stores them, with
llama.cpp's interleaved RoPE; the model un-permutes the q/k rows and rotates halves. A wrong
un-permutation keeps the top-1 token plausible but moves logits by units, so logits are compared,
at every position of each prompt and at the decode steps that follow.
"""

import dataclasses
import functools
import importlib.util

import numpy as np
import pytest

MISSING = [m for m in ("gguf", "tokenizers") if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(
        f"the GGUF model check needs {', '.join(MISSING)} (pip install 'jaxinfer[models]')", allow_module_level=True
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from llama_ref64 import llama_logits64  # noqa: E402

from jaxinfer.models.gguf import (  # noqa: E402
    default_gguf_path,
    llama_config,
    llama_params,
    read_gguf,
    unpermute_rope_rows,
)
from jaxinfer.models.llama import LlamaModel, paged_logits  # noqa: E402
from jaxinfer.models.tokenizer import ChatTokenizer  # noqa: E402
from jaxinfer.nn import KVCachePool, StepPlanner  # noqa: E402

try:
    default_gguf_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def contents():
    return read_gguf()


@pytest.fixture(scope="module")
def tokenizer(contents):
    return ChatTokenizer.from_metadata(contents.metadata)


@functools.cache
def load_model(dtype) -> LlamaModel:
    return LlamaModel.from_gguf(dtype=dtype)


def relative_error(got, want) -> float:
    """``max |got - want| / max |want|`` over all positions and the vocabulary."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def step_logits_all_rows(graphdef, params, caches, tokens, batch):
    """Like ``paged_logits`` but the logits of every row (to check every prefill position)."""
    model = nnx.merge(graphdef, params)
    hidden, caches = model(tokens, batch, caches)
    return model.logits(hidden), caches


def run_prompts(model: LlamaModel, prompts, *, backend: str, page_size: int, decode_steps: int):
    """One prefill step of all ``prompts``, then greedy ``decode_steps`` through ``paged_logits``.

    The caches start as NaN, so a read of a slot no step wrote shows. Returns per prompt the
    sequence run (prompt plus the tokens fed to decode) and its logits ``[len(sequence), vocab]``.
    """
    cfg = model.config
    pool = KVCachePool(64, page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    pool.caches = tuple((jnp.full_like(k, jnp.nan), jnp.full_like(v, jnp.nan)) for k, v in pool.caches)
    planner = StepPlanner(
        pool, cfg.num_qo_heads, max_seq_len=128, max_batch_size=len(prompts), backend=backend, q_data_type=cfg.dtype
    )
    graphdef, params = nnx.split(model)
    rids = list(range(len(prompts)))
    for rid, p in zip(rids, prompts):
        pool.add(rid)
        pool.extend(rid, len(p))
    batch = planner.plan({rid: len(p) for rid, p in zip(rids, prompts)}, [])
    tokens = np.zeros(batch.num_rows, np.int32)
    tokens[: sum(map(len, prompts))] = np.concatenate(prompts)
    logits, pool.caches = step_logits_all_rows(graphdef, params, pool.caches, jnp.asarray(tokens), batch)
    logits = np.asarray(logits)
    ends = np.cumsum([len(p) for p in prompts])
    seqs = [list(p) for p in prompts]
    out = [logits[end - len(p) : end] for p, end in zip(prompts, ends)]
    for _ in range(decode_steps):
        nxt = [int(o[-1].argmax()) for o in out]
        for rid, s, t in zip(rids, seqs, nxt):
            s.append(t)
            pool.extend(rid, 1)
        batch = planner.plan({}, rids)
        tokens = np.zeros(batch.num_rows, np.int32)
        tokens[batch.num_prefill_rows : batch.num_prefill_rows + len(rids)] = nxt
        step, pool.caches = paged_logits(graphdef, params, pool.caches, jnp.asarray(tokens), batch)
        out = [np.concatenate([o, np.asarray(step[i])[None]]) for i, o in enumerate(out)]
    return seqs, out


def test_unpermute_inverts_llama_cpp_permutation(rng):
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out here independently.
    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for heads, d in ((9, 64), (3, 64), (2, 6)):
        w = rng.standard_normal((heads * d, 5))
        np.testing.assert_array_equal(unpermute_rope_rows(permute(w, heads), heads), w)
        assert not np.array_equal(permute(w, heads), w)
    with pytest.raises(ValueError, match="w: 9 rows"):
        unpermute_rope_rows(np.zeros((9, 2)), 3)


def test_config_from_gguf_metadata(contents):
    cfg = llama_config(contents.metadata, dtype=jnp.float32)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 1536, 49152)
    assert (cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope_theta == 1e5 and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert "output.weight" not in contents.tensors  # tied embeddings
    with pytest.raises(ValueError, match="general.architecture"):
        llama_config({**contents.metadata, "general.architecture": "gpt2"}, dtype=jnp.float32)
    with pytest.raises(ValueError, match="rope.scaling.type"):
        llama_config({**contents.metadata, "llama.rope.scaling.type": "yarn"}, dtype=jnp.float32)
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="unexpected"):
        llama_params({**contents.tensors, "blk.0.attn_q.bias": np.zeros(576, np.float32)}, tied)
    with pytest.raises(ValueError, match="missing"):
        llama_params(contents.tensors, cfg)  # untied: output.weight is not in the file
    with pytest.raises(FileNotFoundError, match="path"):
        read_gguf(contents.path.with_name("missing.gguf"))


@pytest.mark.parametrize(
    "backend, dtype, max_error, page_size, prompt_names, decode_steps",
    [
        # A 16-token prompt fills a page (its decode starts the next); the chat prompt spans 3 pages.
        pytest.param("xla", jnp.float32, 1e-3, 16, ("france", "page", "chat"), 2, id="xla-float32"),
        # Pallas runs in interpret mode on CPU: one short prompt, over 2 pages of 4 tokens.
        pytest.param("pallas", jnp.bfloat16, 3e-2, 4, ("france",), 1, id="pallas-bfloat16"),
        # The CUDA backends skip off an NVIDIA GPU (conftest).
        pytest.param("fa2", jnp.bfloat16, 3e-2, 16, ("france", "page", "chat"), 2, id="fa2-bfloat16"),
        pytest.param("fa3", jnp.bfloat16, 3e-2, 16, ("france", "page", "chat"), 2, id="fa3-bfloat16"),
    ],
)
def test_logits_match_float64_reference(
    contents, tokenizer, backend, dtype, max_error, page_size, prompt_names, decode_steps
):
    text = "Paged attention stores the key-value cache of every request in fixed-size pages of memory."
    prompts = {
        "france": tokenizer.encode("The capital of France is"),
        "page": tokenizer.encode(text)[:16],
        "chat": tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])),
    }
    assert len(prompts["page"]) == 16 and len(prompts["chat"]) > 2 * 16
    model = load_model(dtype)
    assert model.config.dtype == dtype and model.config.tie_word_embeddings and model.lm_head is None
    # A float32 model means float32 matmuls, also where XLA would pick TF32 (GPU).
    with jax.default_matmul_precision("highest" if dtype == jnp.float32 else None):
        seqs, logits = run_prompts(
            model, [prompts[n] for n in prompt_names], backend=backend, page_size=page_size, decode_steps=decode_steps
        )
    refs = llama_logits64(contents.tensors, contents.metadata, seqs)
    for name, got, want in zip(prompt_names, logits, refs):
        err = relative_error(got, want)
        assert err <= max_error, f"{name}: relative logit error {err:.2e} > {max_error:.0e}"
    paris = tokenizer.encode(" Paris")
    assert len(paris) == 1
    france = prompt_names.index("france")
    n = len(prompts["france"])
    assert logits[france][n - 1].argmax() == refs[france][n - 1].argmax() == paris[0]


def test_tokenizer_round_trip_and_pieces(tokenizer):
    texts = [
        "Hello world",
        "The year 2024 had 366 days.",
        "  two  spaces\n\nnew lines\ttab ",
        "héllo 你好 🤗 naïve café",
        "def f(x):\n    return x ** 2  # comment",
        "<|im_start|>user\nhi<|im_end|>\n",
        "",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    pieces = lambda text: [tokenizer.tokenizer.id_to_token(i) for i in tokenizer.encode(text)]  # noqa: E731
    assert pieces("Hello world") == ["Hello", "Ġworld"]
    assert pieces(" 2024") == ["Ġ", "2", "0", "2", "4"]  # smollm pre-tokenizer: every digit alone
    im_start, im_end = tokenizer.encode("<|im_start|>"), tokenizer.encode("<|im_end|>")
    assert (im_start, im_end) == ([1], [2])
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tokenizer.decode([1, 2, 3], skip_special_tokens=True) == ""
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.add_bos_token) == (1, 2, False)
    assert tokenizer.stop_token_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    with pytest.raises(ValueError, match="ids"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="text"):
        tokenizer.encode(b"bytes")


def test_decode_stream_matches_decode(tokenizer):
    text = "Streaming: 你好 🤗 done."
    ids = tokenizer.encode(text)
    step = tokenizer.decode_stream()
    assert "".join(step(i) for i in ids) == text


CONVERSATIONS = [
    [],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and\nthen?"},
    ],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
]


def test_chat_template_is_chatml_with_default_system_prompt(tokenizer):
    assert tokenizer.default_system_prompt == SYSTEM
    # Written by hand from the template text in the GGUF (tokenizer.chat_template).
    assert tokenizer.apply_chat_template(CONVERSATIONS[1]) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template([]) == "<|im_start|>assistant\n"
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])
    other = ChatTokenizer(
        tokenizer.tokenizer, bos_token_id=1, eos_token_id=2, add_bos_token=False, stop_token_ids=frozenset({2}),
        chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    )
    with pytest.raises(NotImplementedError, match="ChatML"):
        other.apply_chat_template(CONVERSATIONS[1])


def test_chat_template_matches_jinja_rendering(tokenizer):
    jinja2 = pytest.importorskip("jinja2", reason="rendering the GGUF's Jinja template needs jinja2")
    template = jinja2.Environment().from_string(tokenizer.chat_template)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = template.render(messages=messages, add_generation_prompt=gen)
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == want
