"""Pallas merge-state kernels: fold attention states ``(v, lse)`` (Triton lowering on GPU).

An attention state over a key set is ``(v, s)``: the softmax-weighted value and the base-2 LSE of
the scaled logits. States over disjoint key sets compose (FlashInfer paper, arXiv 2501.01005,
sec. 2.2): ``s = log2(sum_i 2**s_i)``, ``v = sum_i 2**(s_i - s) v_i``. States with ``s_i = -inf``
add nothing, whatever their ``v_i`` holds (inf and NaN included); if all are ``-inf`` the result
is ``v = 0, s = -inf`` (never NaN).

Two users: :func:`merge_partials` folds the split-KV partial rows of the attention kernel over
variable-length groups (``merge_indptr``), and :func:`merge_state` / :func:`merge_states`
implement the public API on the Pallas backend.

Final rows get the variant's epilogue here or in the attention kernel (an unsplit tile): the
attention sink of the row's head (:func:`jaxinfer.variants.apply_sink`, after the merge, so a
split row counts its sink once) and then the output transform, whose ``variant_params`` arrive
as kernel inputs laid out by :class:`ParamLayout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.backends.vma import varying_like
from jaxinfer.plan.batch import next_pow2
from jaxinfer.plan.layout import MERGE_FIELDS
from jaxinfer.variants import apply_sink

NEG_INF = float("-inf")
MERGE_ROWS = 16  # rows (L*H) per program of the public merge kernels


_force_triton = False


def interpret_mode() -> bool:
    """Pallas interpret mode unless the default device is a GPU (the kernels lower to Triton)."""
    return not _force_triton and jax.devices()[0].platform != "gpu"


@contextlib.contextmanager
def force_triton_lowering():
    """Lower to Triton even without a GPU: for deviceless export (shared/DESIGN.md section 6)."""
    global _force_triton
    saved, _force_triton = _force_triton, True
    try:
        yield
    finally:
        _force_triton = saved


def row_block(ref, rows, width: int, col0: int = 0):
    """``ref.at[rows, col0:col0+width]`` of a 2-D ref as a gather (array indices on both axes,
    which both interpret mode and the Triton lowering accept; Triton still sees contiguous rows)."""
    cols = lax.iota(jnp.int32, width) + col0 if col0 else lax.iota(jnp.int32, width)
    shape = (rows.shape[0], width)
    return ref.at[jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(cols[None, :], shape)]


def fold_init(rows: int, cols: int):
    """Empty state ``(m = -inf, w = 0, acc = 0)`` of ``rows`` rows of ``cols`` values (float32)."""
    return (
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, cols), jnp.float32),
    )


def fold(state, v_i, s_i):
    """Add state ``(v_i [R, C], s_i [R])`` to the running ``(m, w, acc)`` (base 2, max-shifted).

    A state with ``s_i = -inf`` adds nothing whatever ``v_i`` holds (its weight is 0, and
    ``0 * inf`` or ``0 * NaN`` would be NaN), so its values are not read.
    """
    m, w, acc = state
    m_new = jnp.maximum(m, s_i)
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    a = jnp.exp2(m - m_safe)
    b = jnp.exp2(s_i - m_safe)
    return m_new, w * a + b, acc * a[:, None] + jnp.where((s_i == NEG_INF)[:, None], 0.0, b[:, None] * v_i)


def finish(state):
    """``(v [R, C], s [R])`` of a running state; rows that saw nothing give ``(0, -inf)``."""
    m, w, acc = state
    seen = w > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, w, 1.0), 0.0)
    return acc * inv[:, None], jnp.where(seen, m + jnp.log2(jnp.where(seen, w, 1.0)), NEG_INF)


def apply_output_transform(o, lse, q_pos, qo_head, transform, use_softmax: bool):
    """Step 10 of jaxinfer/variants.py on final rows (``lse`` is ``None`` without softmax)."""
    if transform is None:
        return o
    return transform(o, lse if use_softmax else None, q_pos, qo_head)


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Static layout of a run's ``variant_params`` as kernel inputs (jaxinfer/variants.py).

    Attributes:
      treedef: the pytree structure of the params.
      tails: per leaf, ``None`` for a scalar (passed as ``[1]``), ``()`` for ``[Hq]``, ``(T,)``
        for ``[Hq, T]`` (passed flat as ``[Hq * T]``; ``T`` a power of 2, a Triton tensor size).
    """

    treedef: Any
    tails: tuple

    @staticmethod
    def of(params) -> tuple[ParamLayout, tuple]:
        """The layout of checked ``params`` and their leaves as 1-D kernel inputs.

        Raises:
          ValueError: a ``[Hq, T]`` leaf with ``T`` not a power of 2.
        """
        leaves, treedef = jax.tree.flatten(params)
        tails = tuple(None if p.ndim == 0 else tuple(p.shape[1:]) for p in leaves)
        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            if p.ndim == 2 and p.shape[1] & (p.shape[1] - 1):
                raise ValueError(f"variant_params{jax.tree_util.keystr(path)} of shape {tuple(p.shape)}: the pallas "
                                 "backend needs T in [Hq, T] to be a power of 2 (a Triton tensor size)")
        return ParamLayout(treedef, tails), tuple(p.reshape(-1) for p in leaves)

    def load(self, refs, qo_head):
        """The params of rows of heads ``qo_head [R]`` (int32, in range): ``[R]`` / ``[R, T]``
        per-head leaves, loaded by a gather from memory; scalars as they are."""
        vals = []
        for ref, tail in zip(refs, self.tails):
            if tail is None:
                vals.append(ref[0])
            elif not tail:
                vals.append(pltriton.load(ref.at[qo_head]))
            else:
                idx = qo_head[:, None] * tail[0] + lax.iota(jnp.int32, tail[0])[None, :]
                vals.append(pltriton.load(ref.at[idx]))
        return self.treedef.unflatten(vals)


def final_rows(o, lse, q_pos, qo_head, *, sink=None, output_transform=None, params=None, use_softmax: bool = True):
    """Steps 9-10 of jaxinfer/variants.py on final rows ``o [R, D]``, ``lse [R]``: the sink
    (``sink [R]`` float32 in log2 units, or ``None``), then the output transform (given
    ``params``, the rows' variant params, as its last argument when not ``None``).
    Returns ``(o, lse)``."""
    if sink is not None:
        o, lse = apply_sink(o, lse, sink)
    if output_transform is not None and params is not None:
        transform = output_transform
        output_transform = lambda *args: transform(*args, params)  # noqa: E731
    return apply_output_transform(o, lse, q_pos, qo_head, output_transform, use_softmax), lse


def _partials_kernel(buf_ref, po_ref, plse_ref, *refs, off_indptr, off_dest, block_m, group_size, num_qo_heads,
                     head_dim, use_softmax, output_transform, sinks, param_layout):
    sink_ref = refs[0] if sinks else None
    param_refs = refs[sinks : len(refs) - 4]
    o_ref, lse_ref = refs[-2:]
    g = pl.program_id(0)
    p0, p1 = buf_ref[off_indptr + g], buf_ref[off_indptr + g + 1]
    dest = off_dest + len(MERGE_FIELDS) * g
    kv_head, q_row0, q_len = buf_ref[dest], buf_ref[dest + 1], buf_ref[dest + 2]
    r = lax.iota(jnp.int32, block_m)
    tok = r // group_size
    ok = (tok < jnp.minimum(q_len, o_ref.shape[0] // num_qo_heads - q_row0)) & (p1 > p0)  # rows inside o
    qo_head = kv_head * group_size + r % group_size
    out_rows = jnp.where(ok, (q_row0 + tok) * num_qo_heads + qo_head, o_ref.shape[0])
    ok2 = jnp.broadcast_to(ok[:, None], (block_m, head_dim))

    def body(p, state):
        prow = jnp.where(ok, p * block_m + r, 0)
        v_i = pltriton.load(row_block(po_ref, prow, head_dim), mask=ok2, other=0.0)
        if not use_softmax:  # partial plain sums add
            return state[0], state[1], state[2] + v_i
        s_i = pltriton.load(plse_ref.at[prow], mask=ok, other=NEG_INF)
        return fold(state, v_i, s_i)

    state = lax.fori_loop(p0, p1, body, fold_init(block_m, head_dim))
    v, s = finish(state) if use_softmax else (state[2], state[1])
    if sinks or output_transform is not None:
        head = jnp.where(ok, qo_head, 0)  # an unused group's dest may name any head: loads stay in range
        v, s = final_rows(
            v, s, buf_ref[dest + 3] + tok, qo_head, sink=pltriton.load(sink_ref.at[head]) if sinks else None,
            output_transform=output_transform, use_softmax=use_softmax,
            params=None if param_layout is None else param_layout.load(param_refs, head),
        )
    pltriton.store(row_block(o_ref, out_rows, head_dim), v.astype(o_ref.dtype), mask=ok2)
    pltriton.store(lse_ref.at[out_rows], s, mask=ok)


def merge_partials(plan_buffer, partial_o, partial_lse, o, lse, *, off_indptr: int, off_dest: int, num_groups: int, block_m: int, group_size: int, num_qo_heads: int, num_warps: int = 4, use_softmax: bool = True, output_transform=None, sinks=None, params=(), param_layout: ParamLayout | None = None):
    """Fold split-KV partial rows into the final output (the plan's second kernel).

    Args:
      plan_buffer: the plan's packed int32 buffer; at ``off_indptr`` the ``[num_groups+1]``
        merge indptr (group g folds partial slots ``merge_indptr[g]:[g+1]``), at ``off_dest``
        the ``[num_groups, 4]`` ``(kv_head, q_row0, q_len, q_pos0)`` of each group's final rows.
      partial_o: ``[slots * block_m, D]`` float32; slot p holds rows ``p*block_m + r``.
      partial_lse: ``[slots * block_m]`` float32 base 2.
      o: ``[nnz_q * Hq, D]`` output rows (updated in place: aliased), lse ``[nnz_q * Hq]`` float32.
      use_softmax: ``False`` adds the partials (plain weighted sums, no lse) instead of folding.
      output_transform: the variant's ``(o, lse, q_pos, qo_head) -> o``, applied to merged rows
        (with ``param_layout``: ``(o, lse, q_pos, qo_head, params) -> o``).
      sinks: ``[Hq]`` float32 sink logits in log2 units (natural ones times ``log2(e)``), applied
        to merged rows before the output transform (:func:`jaxinfer.variants.apply_sink`); or
        ``None``.
      params, param_layout: a run's variant params as :meth:`ParamLayout.of` returns them.

    Returns:
      ``(o, lse)`` with every split group's rows written (row ``r`` of a tile is query token
      ``q_row0 + r // group_size``, head ``kv_head * group_size + r % group_size``).
    """
    head_dim = o.shape[1]
    kernel = functools.partial(
        _partials_kernel, off_indptr=off_indptr, off_dest=off_dest, block_m=block_m, group_size=group_size,
        num_qo_heads=num_qo_heads, head_dim=head_dim, use_softmax=use_softmax, output_transform=output_transform,
        sinks=sinks is not None, param_layout=param_layout,
    )
    extra = ((sinks,) if sinks is not None else ()) + tuple(params)
    return pl.pallas_call(
        kernel,
        out_shape=varying_like((jax.ShapeDtypeStruct(o.shape, o.dtype), jax.ShapeDtypeStruct(lse.shape, lse.dtype)),
                               plan_buffer, partial_o, partial_lse, extra, o, lse),
        grid=(num_groups,),
        input_output_aliases={3 + len(extra): 0, 4 + len(extra): 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret_mode(),
    )(plan_buffer, partial_o, partial_lse, *extra, o, lse)


def _states_kernel(*refs, counts, num_heads, head_dim, num_rows):
    n_in = len(counts)
    v_refs, s_refs = refs[:n_in], refs[n_in : 2 * n_in]
    v_out, s_out = refs[2 * n_in :]
    d_pad = next_pow2(head_dim)
    row = pl.program_id(0) * MERGE_ROWS + lax.iota(jnp.int32, MERGE_ROWS)
    ok = row < num_rows
    row = jnp.where(ok, row, 0)
    l_idx, h_idx = row // num_heads, row % num_heads
    col = lax.iota(jnp.int32, d_pad)
    ok2 = ok[:, None] & (col < head_dim)[None, :]
    state = fold_init(MERGE_ROWS, d_pad)
    for v_ref, s_ref, n in zip(v_refs, s_refs, counts):

        def body(j, st, v_ref=v_ref, s_ref=s_ref, n=n):
            srow = (l_idx * n + j) * num_heads + h_idx
            v_i = pltriton.load(v_ref.at[srow[:, None] * head_dim + col[None, :]], mask=ok2, other=0.0)
            s_i = pltriton.load(s_ref.at[srow], mask=ok, other=NEG_INF)
            return fold(st, v_i.astype(jnp.float32), s_i)

        state = lax.fori_loop(0, n, body, state)
    v, s = finish(state)
    # Masked-off lanes store past the end (dropped in interpret mode, never written on the GPU).
    out_idx = jnp.where(ok2, row[:, None] * head_dim + col[None, :], num_rows * head_dim)
    pltriton.store(v_out.at[out_idx], v.astype(v_out.dtype), mask=ok2)
    pltriton.store(s_out.at[jnp.where(ok, row, num_rows)], s, mask=ok)


def _merge(pairs):
    """Merge ``[(v [L, N_k, H, D], s [L, N_k, H]), ...]`` over all k and N_k in one kernel."""
    L, _, H, D = pairs[0][0].shape
    dtype = pairs[0][0].dtype
    for v, s in pairs:
        if v.ndim != 4 or v.shape[0] != L or v.shape[2:] != (H, D) or s.shape != v.shape[:3]:
            raise ValueError(f"states must be v [L, N, H, D] with s [L, N, H] of one L, H, D; got {v.shape}, {s.shape}")
    counts = tuple(int(v.shape[1]) for v, _ in pairs)
    kernel = functools.partial(_states_kernel, counts=counts, num_heads=H, head_dim=D, num_rows=L * H)
    v_flat, s_out = pl.pallas_call(
        kernel,
        out_shape=varying_like((jax.ShapeDtypeStruct((L * H * D,), dtype),
                                jax.ShapeDtypeStruct((L * H,), jnp.float32)), pairs),
        grid=(pl.cdiv(L * H, MERGE_ROWS),),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret_mode(),
    )(*[v.reshape(-1) for v, _ in pairs], *[s.astype(jnp.float32).reshape(-1) for _, s in pairs])
    return v_flat.reshape(L, H, D), s_out.reshape(L, H)


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two attention states (Pallas; FlashInfer paper sec. 2.2).

    Args:
      v_a, v_b: ``[L, H, D]`` (bf16, fp16 or float32); s_a, s_b: ``[L, H]`` base-2 LSE.

    Returns:
      ``(v [L, H, D] in v_a's dtype, s [L, H] float32)``.

    Raises:
      ValueError: shapes disagree.
    """
    if v_a.shape != v_b.shape or s_a.shape != s_b.shape or s_a.shape != v_a.shape[:2]:
        raise ValueError(f"merge_state needs v [L, H, D] and s [L, H] of equal shapes, got {v_a.shape}, {s_a.shape}, {v_b.shape}, {s_b.shape}")
    return _merge([(v_a[:, None], s_a[:, None]), (v_b[:, None].astype(v_a.dtype), s_b[:, None])])


def merge_states(v, s):
    """Merge ``N`` attention states per row (Pallas; FlashInfer paper sec. 2.2).

    Args:
      v: ``[L, N, H, D]``; s: ``[L, N, H]`` base-2 LSE.

    Returns:
      ``(v [L, H, D] in v's dtype, s [L, H] float32)``; ``N = 0`` gives ``(0, -inf)``.

    Raises:
      ValueError: shapes disagree.
    """
    if v.ndim != 4 or s.shape != v.shape[:3]:
        raise ValueError(f"merge_states needs v [L, N, H, D] and s [L, N, H], got {v.shape}, {s.shape}")
    return _merge([(v, s)])
