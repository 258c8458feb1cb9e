"""RoPE against an independent float64 numpy complex rotation, Llama 3.1 against its published formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.rope import (
    Llama31Scaling,
    apply_llama31_rope,
    apply_llama31_rope_pos_ids,
    apply_rope,
    apply_rope_pos_ids,
    rope_frequencies,
)


def freqs64(rotary_dim, rope_scale, rope_theta):
    return rope_theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim) / rope_scale


def llama31_freqs64(rotary_dim, rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's ``apply_scaling`` (llama-models, Llama 3.1 reference), piecewise in the wavelength."""
    out = []
    for freq in freqs64(rotary_dim, 1.0, rope_theta):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high_freq_factor:
            out.append(freq)
        elif wavelen > old_context_len / low_freq_factor:
            out.append(freq / rope_scale)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / rope_scale + smooth * freq)
    return np.asarray(out)


def rope64(x, pos, freqs, interleave):
    """Rotate pairs as complex numbers ``(a + i b) * exp(i pos f)``; dims past the pairs pass through."""
    x = np.asarray(x, np.float64)
    r = 2 * freqs.size
    if interleave:
        z = x[..., 0:r:2] + 1j * x[..., 1:r:2]
    else:
        z = x[..., : r // 2] + 1j * x[..., r // 2 : r]
    z = z * np.exp(1j * np.asarray(pos, np.float64)[:, None, None] * freqs[None, None, :])
    out = x.copy()
    if interleave:
        out[..., 0:r:2], out[..., 1:r:2] = z.real, z.imag
    else:
        out[..., : r // 2], out[..., r // 2 : r] = z.real, z.imag
    return out


def assert_rope_close(got, x, pos, freqs, interleave):
    """float32 angles ``pos * f`` carry an absolute error of a few ``pos * 2**-26``; bf16 outputs 2**-8."""
    want = rope64(x, pos, freqs, interleave)
    got = np.asarray(got.astype(jnp.float32), np.float64)
    scale = np.abs(np.asarray(x, np.float64)).max()
    if x.dtype == jnp.bfloat16:
        tol = 1e-2 * scale
    else:
        tol = (1e-6 + 2.0**-24 * np.max(pos)) * scale
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # Dims past rotary_dim are copied bit for bit.
    np.testing.assert_array_equal(got[..., 2 * freqs.size :], np.asarray(x[..., 2 * freqs.size :], np.float64))


def ragged(lens):
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return jnp.asarray(indptr)


def random_qk(rng, nnz, hq, hk, d, dtype):
    q = jnp.asarray(rng.standard_normal((nnz, hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((nnz, hk, d)), dtype)
    return q, k


def ragged_positions(indptr, offsets):
    indptr = np.asarray(indptr)
    return np.concatenate([offsets[b] + np.arange(indptr[b + 1] - indptr[b]) for b in range(len(offsets))])


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_rope_matches_complex_rotation(interleave, rotary_dim, dtype):
    rng = np.random.default_rng(0)
    d = 16
    indptr = ragged([5, 0, 3, 7])
    offsets = np.array([0, 4, 100, 37], np.int32)
    q, k = random_qk(rng, int(indptr[-1]), 4, 2, d, dtype)
    q_rope, k_rope = apply_rope(q, k, indptr, jnp.asarray(offsets), rotary_dim=rotary_dim, interleave=interleave)
    assert (q_rope.dtype, q_rope.shape, k_rope.dtype, k_rope.shape) == (dtype, q.shape, dtype, k.shape)
    freqs = freqs64(rotary_dim or d, 1.0, 1e4)
    pos = ragged_positions(indptr, offsets)
    assert_rope_close(q_rope, q, pos, freqs, interleave)
    assert_rope_close(k_rope, k, pos, freqs, interleave)


@pytest.mark.parametrize("interleave", [False, True])
def test_apply_rope_pos_ids_scale_and_theta(interleave):
    rng = np.random.default_rng(1)
    d, rotary_dim, nnz = 32, 24, 9
    q, k = random_qk(rng, nnz, 2, 1, d, jnp.float32)
    pos = rng.permutation(3000)[:nnz].astype(np.int32)
    q_rope, k_rope = apply_rope_pos_ids(
        q, k, jnp.asarray(pos), rotary_dim=rotary_dim, interleave=interleave, rope_scale=2.5, rope_theta=5e5
    )
    freqs = freqs64(rotary_dim, 2.5, 5e5)
    assert_rope_close(q_rope, q, pos, freqs, interleave)
    assert_rope_close(k_rope, k, pos, freqs, interleave)


def test_apply_rope_padding_rows_pass_through_and_jit():
    rng = np.random.default_rng(2)
    indptr = ragged([3, 2])
    offsets = jnp.array([5, 9], jnp.int32)
    q, k = random_qk(rng, 8, 2, 2, 8, jnp.float32)  # rows 5..7 are padding
    f = jax.jit(lambda q, k, i, o: apply_rope(q, k, i, o, rotary_dim=4))
    q_rope, k_rope = f(q, k, indptr, offsets)
    np.testing.assert_array_equal(q_rope[5:], q[5:])
    np.testing.assert_array_equal(k_rope[5:], k[5:])
    pos = ragged_positions(indptr, np.asarray(offsets))
    assert_rope_close(q_rope[:5], q[:5], pos, freqs64(4, 1.0, 1e4), False)


@pytest.mark.parametrize(
    "scaling",
    [
        dict(rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192),
        dict(rope_scale=4.0, rope_theta=1e4, low_freq_factor=2.0, high_freq_factor=8.0, old_context_len=1024),
    ],
)
def test_llama31_frequencies_match_published_formula(scaling):
    rotary_dim = 128
    want = llama31_freqs64(rotary_dim, **scaling)
    # The test is only meaningful if all three regimes (kept, smoothed, divided) occur.
    base = freqs64(rotary_dim, 1.0, scaling["rope_theta"])
    assert np.any(want == base) and np.any(np.isclose(want, base / scaling["rope_scale"], rtol=1e-12))
    assert np.any((want != base) & ~np.isclose(want, base / scaling["rope_scale"], rtol=1e-12))
    got = rope_frequencies(
        rotary_dim, scaling["rope_scale"], scaling["rope_theta"],
        Llama31Scaling(scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["old_context_len"]),
    )
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=5e-6)


@pytest.mark.parametrize("interleave", [False, True])
def test_apply_llama31_rope_defaults(interleave):
    rng = np.random.default_rng(3)
    d = 64
    indptr = ragged([4, 6])
    offsets = np.array([9000, 130], np.int32)  # past old_context_len, where the scaling matters
    q, k = random_qk(rng, 10, 4, 1, d, jnp.float32)
    freqs = llama31_freqs64(d, 8.0, 5e5, 1.0, 4.0, 8192)
    pos = ragged_positions(indptr, offsets)
    q_rope, k_rope = apply_llama31_rope(q, k, indptr, jnp.asarray(offsets), interleave=interleave)
    assert_rope_close(q_rope, q, pos, freqs, interleave)
    assert_rope_close(k_rope, k, pos, freqs, interleave)
    q_ids, k_ids = apply_llama31_rope_pos_ids(q, k, jnp.asarray(pos, jnp.int32), interleave=interleave)
    assert_rope_close(q_ids, q, pos, freqs, interleave)
    assert_rope_close(k_ids, k, pos, freqs, interleave)


def test_llama31_partial_rotary_dim_and_options():
    rng = np.random.default_rng(4)
    d, rotary_dim = 64, 32
    pos = rng.integers(0, 20000, 6).astype(np.int32)
    q, k = random_qk(rng, 6, 2, 2, d, jnp.bfloat16)
    options = dict(rope_scale=16.0, rope_theta=1e5, low_freq_factor=2.0, high_freq_factor=8.0, old_context_len=2048)
    q_rope, k_rope = apply_llama31_rope_pos_ids(q, k, jnp.asarray(pos), rotary_dim=rotary_dim, **options)
    freqs = llama31_freqs64(rotary_dim, **options)
    assert_rope_close(q_rope, q, pos, freqs, False)
    assert_rope_close(k_rope, k, pos, freqs, False)


def _qk(nnz=4, d=8):
    return jnp.ones((nnz, 2, d), jnp.float32), jnp.ones((nnz, 1, d), jnp.float32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: apply_rope_pos_ids(*_qk(), jnp.arange(4), rotary_dim=3), "rotary_dim"),
        (lambda: apply_rope_pos_ids(*_qk(), jnp.arange(4), rotary_dim=10), "rotary_dim"),
        (lambda: apply_rope_pos_ids(*_qk(), jnp.arange(5)), "pos_ids"),
        (lambda: apply_rope_pos_ids(*_qk(), jnp.arange(4.0)), "pos_ids"),
        (lambda: apply_rope_pos_ids(jnp.ones((4, 8)), _qk()[1], jnp.arange(4)), "q must be"),
        (lambda: apply_rope_pos_ids(_qk()[0], jnp.ones((3, 1, 8)), jnp.arange(4)), "k must be"),
        (lambda: apply_rope_pos_ids(*_qk(), jnp.arange(4), rope_scale=0.0), "rope_scale"),
        (lambda: apply_rope(*_qk(), jnp.array([0, 4]), jnp.array([0, 1])), "offsets"),
        (lambda: apply_rope(*_qk(), jnp.array([[0, 4]]), jnp.array([0])), "indptr"),
        (lambda: apply_llama31_rope(*_qk(), jnp.array([0, 4]), jnp.array([0]), low_freq_factor=4.0), "low_freq_factor"),
        (lambda: apply_llama31_rope_pos_ids(*_qk(), jnp.arange(4), old_context_len=0), "old_context_len"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
