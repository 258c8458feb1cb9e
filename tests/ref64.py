"""Independent float64 numpy reference of jaxinfer's attention semantics, for tests only.

Written from the contract (shared/DESIGN.md sections 2-3 and the logits pipeline of
``jaxinfer/variants.py``), not from ``jaxinfer/backends/xla.py``: tests compare the library against
this file, so it must not share code with what it checks. Everything is computed in float64 with
explicit loops over requests and dense ``[Hq, Lq, Lk]`` logits; speed does not matter, clarity does.

LSE values are base 2 (FlashInfer's convention); a query row with no visible key gets
``o = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxinfer.variants import AttentionVariant

def f64(x) -> np.ndarray:
    """Any array (numpy, JAX, bf16/fp16) as a float64 numpy array."""
    return np.asarray(x).astype(np.float64)


def alibi_slopes_ref(num_heads: int) -> np.ndarray:
    """ALiBi slopes ``[num_heads]`` float64, transcribed from Press et al. 2022 (ALiBi, sec. 3 and
    the authors' ``get_slopes``): a geometric sequence starting at ``2**(-8/n)`` with that ratio
    for a power of 2 ``n``; otherwise the closest smaller power of 2's slopes followed by every
    other slope of the next power of 2.
    """

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_2(num_heads), dtype=np.float64)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = alibi_slopes_ref(2 * closest)[0::2][: num_heads - closest]
    return np.concatenate([power_of_2(closest), extra])


def rope_rotate_half(x: np.ndarray, pos: np.ndarray, rope_scale: float, rope_theta: float) -> np.ndarray:
    """Rotate-half (Llama / GPT-NeoX) RoPE of ``x [L, H, D]`` at integer positions ``pos [L]``.

    Dimension pairs ``(d, d + D/2)`` rotate by ``pos / rope_scale * rope_theta ** (-2 d / D)``.
    """
    d_model = x.shape[-1]
    half = d_model // 2
    freq = rope_theta ** (-2.0 * np.arange(half, dtype=np.float64) / d_model) / rope_scale
    angle = np.asarray(pos, dtype=np.float64)[:, None] * freq[None, :]  # [L, D/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def ref_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    window_left: int = -1,
    logits_soft_cap: float | None = None,
    sm_scale: float | None = None,
    pos_encoding_mode: str = "NONE",
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    custom_mask=None,
    variant: AttentionVariant | None = None,
    sinks=None,
    variant_params=None,
):
    """Attention of ONE request in float64, following steps 1-10 of ``jaxinfer/variants.py``.

    Args:
      q: ``[Lq, Hq, D]``; k, v: ``[Lk, Hkv, D]`` (any float dtype; computed in float64).
      custom_mask: ``[Lq, Lk]`` bool (True keeps the key) or ``None``.
      variant: if given, its fields and callables replace the keyword options. Callables get
        numpy arrays: ``logits_transform(x [Hq,Lq,Lk], q_pos [1,Lq,1], kv_pos [1,1,Lk],
        qo_head [Hq,1,1], kv_head [Hq,1,1])``, ``logits_mask`` likewise without ``x``,
        ``query_transform(q [Lq,Hq,D])``, ``key_transform(k [Lk,Hkv,D])``,
        ``output_transform(o [Lq,Hq,D], lse [Lq,Hq] or None without softmax, q_pos [Lq,1],
        qo_head [1,Hq])``.
      sinks: optional ``[Hq]`` natural-log sink logits: ``s_h`` joins the softmax denominator,
        ``o = sum_j e^{x_j} v_j / (sum_j e^{x_j} + e^{s_h})``, ``lse = ln(sum_j e^{x_j} + e^{s_h})
        / ln 2`` (gpt-oss attention sinks), before the output transform.
      variant_params: for a ``takes_params`` variant, a dict of arrays ``[]``, ``[Hq]`` or
        ``[Hq, T]``; each callable but ``key_transform`` gets, as its last argument, the dict
        with every per-head leaf ``p`` taken at the callable's heads (``p[qo_head]``;
        ``query_transform``: ``p[None, arange(Hq)]``).

    Returns:
      ``(o [Lq, Hq, D] float64, lse [Lq, Hq] float64 base 2)``; ``lse`` is ``None`` without
      softmax. A row with no visible key gives ``o = 0`` and ``lse = -inf``.
    """
    var = variant or AttentionVariant(
        causal=causal,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        sm_scale=sm_scale,
        pos_encoding_mode=pos_encoding_mode,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
    )
    q, k, v = f64(q), f64(k), f64(v)
    lq, hq, d_model = q.shape
    if variant_params is not None:
        var = _bind_params_ref(var, variant_params, hq)
    lk, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    group = hq // hkv
    q_pos = np.arange(lq) + lk - lq  # bottom-right alignment
    kv_pos = np.arange(lk)

    # 1. user transforms of query and key rows.
    if var.query_transform is not None:
        q = f64(var.query_transform(q))
    if var.key_transform is not None:
        k = f64(var.key_transform(k))
    # 2. rotary embedding inside attention.
    if var.pos_encoding_mode == "ROPE_LLAMA":
        q = rope_rotate_half(q, q_pos, var.rope_scale, var.rope_theta)
        k = rope_rotate_half(k, kv_pos, var.rope_scale, var.rope_theta)
    # GQA: query head h reads kv head h // group.
    kv_head = np.arange(hq) // group
    k_h = k[:, kv_head, :]  # [Lk, Hq, D]
    v_h = v[:, kv_head, :]
    # 3. scaled logits [Hq, Lq, Lk].
    scale = var.sm_scale if var.sm_scale is not None else 1.0 / math.sqrt(d_model)
    x = np.einsum("ihd,jhd->hij", q, k_h) * scale
    # 4. soft cap.
    if var.logits_soft_cap:
        c = var.logits_soft_cap
        x = c * np.tanh(x / c)
    # 5. ALiBi bias.
    rel = kv_pos[None, None, :] - q_pos[None, :, None]  # [1, Lq, Lk]
    if var.pos_encoding_mode == "ALIBI":
        x = x + alibi_slopes_ref(hq)[:, None, None] * rel
    qp = q_pos.astype(np.int32)[None, :, None]
    kp = kv_pos.astype(np.int32)[None, None, :]
    qh = np.arange(hq, dtype=np.int32)[:, None, None]
    kh = kv_head.astype(np.int32)[:, None, None]
    # 6. user logits transform.
    if var.logits_transform is not None:
        x = f64(np.broadcast_to(var.logits_transform(x, qp, kp, qh, kh), x.shape))
    # 7. visibility.
    visible = np.ones((hq, lq, lk), dtype=bool)
    if var.causal:
        visible &= rel <= 0
    if var.window_left >= 0:
        visible &= rel >= -var.window_left
    if custom_mask is not None:
        cm = np.asarray(custom_mask, dtype=bool)
        if cm.shape != (lq, lk):
            raise ValueError(f"custom_mask must be [{lq}, {lk}], got {cm.shape}")
        visible &= cm[None]
    if var.logits_mask is not None:
        visible &= np.broadcast_to(np.asarray(var.logits_mask(qp, kp, qh, kh), dtype=bool), visible.shape)
    # 8. softmax (or plain weighted sum) over visible keys.
    any_visible = visible.any(axis=-1)  # [Hq, Lq]
    if var.use_softmax:
        x_vis = np.where(visible, x, -np.inf)
        row_max = np.where(any_visible, x_vis.max(axis=-1, initial=-np.inf), 0.0)
        p = np.where(visible, np.exp(x_vis - row_max[..., None]), 0.0)
        denom = p.sum(axis=-1)
        safe = np.where(any_visible, denom, 1.0)
        o = np.einsum("hij,jhd->ihd", p / safe[..., None], v_h)
        lse_nat = np.where(any_visible, row_max + np.log(safe), -np.inf)
        lse = (lse_nat / math.log(2.0)).T  # [Lq, Hq]
    else:
        w = np.where(visible, x, 0.0)
        o = np.einsum("hij,jhd->ihd", w, v_h)
        lse = None
    # 9. attention sinks (natural-log logits per query head), in float64.
    if sinks is not None:
        s = f64(sinks).reshape(hq)[None, :]  # [1, Hq]
        lse_nat = lse * math.log(2.0)
        with np.errstate(over="ignore"):
            o = o / (1.0 + np.exp(s - lse_nat))[..., None]  # = o * e^lse / (e^lse + e^s); 0 when lse = -inf
        lse = np.logaddexp(lse_nat, s) / math.log(2.0)
    # 10. user output transform.
    if var.output_transform is not None:
        o = f64(
            var.output_transform(o, lse, q_pos.astype(np.int32)[:, None], np.arange(hq, dtype=np.int32)[None, :])
        )
    return o, lse


def _bind_params_ref(var: AttentionVariant, params: dict, hq: int) -> AttentionVariant:
    """``var`` with each callable given the dict of ``params`` at its heads as a last argument."""

    def at(heads):
        return {name: (f64(p) if np.ndim(p) == 0 else f64(p)[heads]) for name, p in params.items()}

    cells = at(np.arange(hq)[:, None, None])  # the logits' heads [Hq, 1, 1]
    rows = at(np.arange(hq)[None, :])  # the rows' heads [1, Hq] (q [Lq, Hq, D], o [Lq, Hq, D])

    def bound(fn, p):
        return None if fn is None else (lambda *args: fn(*args, p))

    return dataclasses.replace(
        var, takes_params=False, logits_transform=bound(var.logits_transform, cells),
        logits_mask=bound(var.logits_mask, cells), query_transform=bound(var.query_transform, rows),
        output_transform=bound(var.output_transform, rows),
    )


def ref_batch(q, k_list, v_list, qo_indptr, *, custom_mask=None, **options):
    """Attention of a ragged batch: request b is ``q[qo_indptr[b]:qo_indptr[b+1]]`` against
    ``k_list[b], v_list[b]`` (``[Lk_b, Hkv, D]``).

    ``custom_mask`` (optional) is the flat bool concatenation of each request's row-major
    ``[qo_len_b, kv_len_b]`` mask; other keyword options are those of :func:`ref_attention`.

    Returns:
      ``(o [nnz_q, Hq, D], lse [nnz_q, Hq] base 2 or None)`` float64.
    """
    q = f64(q)
    qo_indptr = np.asarray(qo_indptr, dtype=np.int64)
    mask = None if custom_mask is None else np.asarray(custom_mask, dtype=bool).reshape(-1)
    os, lses = [], []
    mask_off = 0
    for b in range(len(qo_indptr) - 1):
        qb = q[qo_indptr[b] : qo_indptr[b + 1]]
        lq, lk = qb.shape[0], np.shape(k_list[b])[0]
        mb = None
        if mask is not None:
            mb = mask[mask_off : mask_off + lq * lk].reshape(lq, lk)
            mask_off += lq * lk
        o, lse = ref_attention(qb, k_list[b], v_list[b], custom_mask=mb, **options)
        os.append(o)
        lses.append(lse)
    if mask is not None and mask_off != mask.size:
        raise ValueError(f"custom_mask has {mask.size} elements, the batch needs {mask_off}")
    o = np.concatenate(os, axis=0) if os else np.zeros((0,) + q.shape[1:])
    if any(x is None for x in lses):
        return o, None
    return o, np.concatenate(lses, axis=0) if lses else np.zeros(q.shape[:2])


def split_kv_cache(paged_kv_cache):
    """``(k_cache, v_cache)`` of a tuple cache or of a single ``[num_pages, 2, ...]`` array."""
    if isinstance(paged_kv_cache, (tuple, list)):
        return paged_kv_cache[0], paged_kv_cache[1]
    arr = np.asarray(paged_kv_cache)
    return arr[:, 0], arr[:, 1]


def gather_paged_kv(k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout="NHD"):
    """Per-request KV of a paged cache (BSR, DESIGN.md section 3) as float64 arrays.

    Args:
      k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` (NHD) or ``[num_pages, Hkv, page_size, D]``
        (HND).
      kv_indptr ``[B+1]``, kv_indices ``[nnz_pages]``, kv_last_page_len ``[B]``.

    Returns:
      ``(k_list, v_list)``: request b's ``[len_b, Hkv, D]`` float64 arrays,
      ``len_b = page_size * (num_pages_b - 1) + last_page_len_b`` (0 without pages).
    """
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout must be NHD or HND, got {kv_layout!r}")
    k_cache, v_cache = f64(k_cache), f64(v_cache)
    if kv_layout == "HND":
        k_cache, v_cache = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
    page_size = k_cache.shape[1]
    kv_indptr = np.asarray(kv_indptr, dtype=np.int64)
    kv_indices = np.asarray(kv_indices, dtype=np.int64)
    last = np.asarray(kv_last_page_len, dtype=np.int64)
    k_list, v_list = [], []
    for b in range(len(kv_indptr) - 1):
        pages = kv_indices[kv_indptr[b] : kv_indptr[b + 1]]
        n = 0 if pages.size == 0 else page_size * (pages.size - 1) + int(last[b])
        tail = k_cache.shape[2:]
        k_list.append(k_cache[pages].reshape((-1,) + tail)[:n])
        v_list.append(v_cache[pages].reshape((-1,) + tail)[:n])
    return k_list, v_list


def dequantize(x_list, scale):
    """The values attention reads from a quantized cache, in float64: each request's ``[L, Hkv, D]``
    stored values (fp8 or any dtype) times ``scale``: ``None`` (1), a number, or ``[Hkv]`` per KV
    head. FlashInfer's ``k_scale``/``v_scale`` definition: the cache holds values / scale."""
    if scale is None:
        return [f64(x) for x in x_list]
    per_head = f64(scale).reshape(-1)
    return [f64(x) * per_head[None, :, None] for x in x_list]


def quantized_bounds(x, scale, dtype) -> tuple[np.ndarray, np.ndarray]:
    """What quantizing ``x [..., Hkv, D]`` into the fp8 ``dtype`` as ``x / scale`` may store, as
    float32 ``(lo, hi)``: the float32 quotient (``scale``: ``None``, a number or ``[Hkv]``), one
    float32 ulp below and above, clipped to the finite range and rounded to nearest even.
    Rounding is monotone, so the correctly rounded value of any quotient within an ulp of the
    exact one lies in ``[lo, hi]``; XLA's float32 division on the CPU is not always correctly
    rounded in its last bit, which moves a quotient at an fp8 rounding midpoint to the
    neighbouring fp8 value. Without a scale there is no division: ``lo == hi``. NaN stays NaN."""
    x = np.asarray(x, np.float32)
    lo = hi = x
    if scale is not None:
        q = x / np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (x.shape[-2],))[:, None]
        lo, hi = np.nextafter(q, np.float32(-np.inf)), np.nextafter(q, np.float32(np.inf))
    limit = float(np.finfo(dtype).max)
    return tuple(np.clip(y, -limit, limit).astype(dtype).astype(np.float32) for y in (lo, hi))


def ref_merge(v_list, s_list):
    """Merge attention states (FlashInfer paper sec. 2.2, "attention state" composition).

    ``(v_i [..., D], s_i [...] base 2)`` merge to ``s = log2(sum_i 2**s_i)`` and
    ``v = sum_i 2**(s_i - s) v_i``. States with ``s_i = -inf`` contribute nothing; if all are
    ``-inf`` the result is ``v = 0``, ``s = -inf``.

    Returns:
      ``(v, s)`` float64.
    """
    vs = np.stack([f64(v) for v in v_list])  # [N, ..., D]
    ss = np.stack([f64(s) for s in s_list])  # [N, ...]
    finite = np.isfinite(ss)
    any_finite = finite.any(axis=0)
    m = np.where(any_finite, np.where(finite, ss, -np.inf).max(axis=0), 0.0)
    w = np.where(finite, np.exp2(np.where(finite, ss, 0.0) - m), 0.0)
    total = w.sum(axis=0)
    safe = np.where(any_finite, total, 1.0)
    v = (w[..., None] * vs).sum(axis=0) / safe[..., None]
    s = np.where(any_finite, m + np.log2(safe), -np.inf)
    return v, s


def random_page_table(rng: np.random.Generator, kv_lens, page_size: int, num_pages_extra: int = 3):
    """A random page table for requests of ``kv_lens`` tokens.

    Pages are unique and shuffled over a cache with ``num_pages_extra`` unused pages, so that a
    kernel that reads the wrong page or ignores ``kv_indices`` order is caught.

    Returns:
      ``(kv_indptr [B+1], kv_indices [nnz_pages], kv_last_page_len [B], num_pages)``; int32 arrays.
      A request of length 0 has no pages and ``last_page_len = 0``.
    """
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    n_pages = -(-kv_lens // page_size)  # ceil
    kv_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    num_pages = int(n_pages.sum()) + int(num_pages_extra)
    kv_indices = rng.permutation(num_pages)[: int(n_pages.sum())].astype(np.int32)
    last = np.where(kv_lens > 0, kv_lens - page_size * (n_pages - 1), 0).astype(np.int32)
    return kv_indptr, kv_indices, last, num_pages
