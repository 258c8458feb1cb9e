"""The work-buffer layout: what the plan stage writes and the kernels read.

A plan of the block-sparse attention kernels is a table of *work tiles* (one row of
:data:`WORK_FIELDS` per tile, ordered by CTA), the tile range of each persistent CTA, the merge
groups of split-KV partials (:data:`MERGE_FIELDS` of each group's final rows) and the page ids, all
int32 and packed back to back into one array so that a plan is one host-to-device copy
(:class:`WorkLayout`). ``jaxinfer/csrc/planner.cc`` writes this layout (its ``Field`` enum and
``jaxinfer_plan_packed`` follow these tuples); the Pallas kernels read it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

# Columns of the ``work`` buffer, one row per work tile.
WORK_FIELDS = (
    "kv_head",  # KV head of the tile; its rows are query heads kv_head*G .. kv_head*G+G-1
    "q_row0",  # first query token of the tile (global row of the ragged q)
    "q_len",  # query tokens of the tile (rows = q_len * group_size)
    "q_pos0",  # position of the first token among the request's keys: index + kv_len - qo_len
    "kv_lo",  # first key of the tile's chunk (token index inside the request)
    "kv_hi",  # one past its last key
    "kv_base",  # the planner's per-request kv_base, copied (pallas: first page in kv_indices or first ragged token)
    "out_slot",  # -1: writes final rows; s >= 0: writes partial rows of slot s
    "valid",  # 1 for a real tile, 0 for padding
    "kv_len",  # keys of the request: the row stride of its custom mask
    "mask_base",  # custom-mask index of the tile's (first token, key 0): request offset + tok0 * kv_len
)
F = {name: i for i, name in enumerate(WORK_FIELDS)}
# Columns of ``merge_dest``: the final rows of a merge group.
MERGE_FIELDS = ("kv_head", "q_row0", "q_len", "q_pos0")


@dataclasses.dataclass(frozen=True)
class WorkLayout:
    """Capacities of a plan's packed int32 buffer and the offsets of its parts.

    The buffer is ``work [max_tiles, len(WORK_FIELDS)] | cta_indptr [num_ctas+1] | merge_indptr
    [num_groups+1] | merge_dest [num_groups, len(MERGE_FIELDS)] | kv_indices [page_capacity]``.

    Attributes:
      num_ctas: persistent CTAs; CTA ``c`` runs work rows ``cta_indptr[c]:cta_indptr[c+1]``.
      num_groups: merge groups; group ``g`` folds partial slots ``merge_indptr[g]:[g+1]``.
      max_tiles: rows of ``work``.
      page_capacity: entries of ``kv_indices``.

    The offsets are computed once per layout (a plan reads them on the host per step).
    """

    num_ctas: int
    num_groups: int
    max_tiles: int
    page_capacity: int

    @functools.cached_property
    def off_cta(self) -> int:
        return self.max_tiles * len(WORK_FIELDS)

    @functools.cached_property
    def off_merge_indptr(self) -> int:
        return self.off_cta + self.num_ctas + 1

    @functools.cached_property
    def off_merge_dest(self) -> int:
        return self.off_merge_indptr + self.num_groups + 1

    @functools.cached_property
    def off_kv_indices(self) -> int:
        return self.off_merge_dest + self.num_groups * len(MERGE_FIELDS)

    @functools.cached_property
    def buffer_size(self) -> int:
        return self.off_kv_indices + self.page_capacity

    def pack(self, work, cta_indptr, merge_indptr, merge_dest, kv_indices):
        """The one int32 buffer of a plan (numpy on the host, jnp inside jit).

        Raises:
          ValueError: the parts do not add up to :attr:`buffer_size` entries.
        """
        xp = np if isinstance(work, np.ndarray) else jnp
        parts = (work, cta_indptr, merge_indptr, merge_dest, kv_indices)
        out = xp.concatenate([xp.asarray(a).astype(np.int32).reshape(-1) for a in parts])
        if out.shape != (self.buffer_size,):
            raise ValueError(f"plan buffers have {out.shape[0]} entries, the layout expects {self.buffer_size}")
        return out

    def unpack(self, buffer) -> dict[str, np.ndarray]:
        """The parts of a packed buffer as named numpy arrays (for tests and debugging)."""
        buf = np.asarray(buffer)
        return {
            "work": buf[: self.off_cta].reshape(self.max_tiles, len(WORK_FIELDS)),
            "cta_indptr": buf[self.off_cta : self.off_merge_indptr],
            "merge_indptr": buf[self.off_merge_indptr : self.off_merge_dest],
            "merge_dest": buf[self.off_merge_dest : self.off_kv_indices].reshape(self.num_groups, len(MERGE_FIELDS)),
            "kv_indices": buf[self.off_kv_indices :],
        }
