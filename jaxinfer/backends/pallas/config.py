"""Static tile configuration of the Pallas attention kernel and the heuristic that picks it.

A :class:`TileConfig` is frozen and hashable: it is static metadata of a plan, so two plans with
equal configs share one compiled kernel. Block shapes are powers of two (Triton's tensors must be;
``tl.dot`` needs at least 16 rows and columns), and query rows that a tile does not fill are
masked.
"""

from __future__ import annotations

import dataclasses

from jaxinfer.plan.batch import next_pow2

MIN_DOT = 16  # smallest M/N/K of tl.dot
MAX_BLOCK_M = 128
MAX_DECODE_LOGITS = 32 * 128  # largest [block_m, block_n] float32 logits tile of a decode config


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile shapes and Triton launch parameters of one attention kernel instance.

    Attributes:
      block_m: query rows of a work tile (query tokens x the GQA group's heads), power of 2 >= 16.
      block_n: keys loaded per inner-loop step, power of 2 >= 16.
      num_warps: warps per program.
      num_stages: software-pipelining depth of the inner loop (Triton's ``num_stages``).
      ctas_per_sm: persistent CTAs per SM the planner budgets for (the grid is SMs x this).
      qk_ahead: each key step issues the next step's ``q.k`` dot before its own softmax
        (software pipelining across steps, one ``[block_m, block_n]`` float32 tile more in
        registers), so that the tensor cores overlap the softmax.
      small_block_m: ``0``, or a smaller row count (power of 2 >= 16, below ``block_m``): work
        tiles whose rows fit it (a mixed batch's decodes) run a body of that many rows, without
        ``qk_ahead``, in the same launch; the other tiles run ``block_m`` rows.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 2
    qk_ahead: bool = False
    small_block_m: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < MIN_DOT or val & (val - 1):
                raise ValueError(f"{name} must be a power of 2 >= {MIN_DOT}, got {val}")
        small = self.small_block_m
        if small and (small < MIN_DOT or small & (small - 1) or small >= self.block_m):
            raise ValueError(f"small_block_m must be 0 or a power of 2 >= {MIN_DOT} below block_m={self.block_m}, "
                             f"got {small}")

    def tokens_per_tile(self, group_size: int) -> int:
        """Query tokens per work tile when the ``group_size`` heads of a KV head are its rows."""
        return max(1, self.block_m // group_size)


def heuristic_config(head_dim: int, page_size: int, group_size: int, avg_qo_len: float,
                     kv_itemsize: int = 2, median_qo_len: float | None = None) -> TileConfig:
    """Pick the tile config for a batch (FlashInfer paper sec. 3.2.2: tile size by query length).

    Decode-like batches (few rows per KV head: ``group_size * avg_qo_len <= 32``) take the
    smallest row tile that holds the GQA group and a long key step, since they are bound by
    memory; prefill-like batches take 64/128-row tiles, bound by the tensor cores. Key steps
    shrink with ``head_dim`` so that ``num_stages`` K/V buffers fit the shared memory. A decode
    tile over an fp8 cache (``kv_itemsize`` 1) takes twice the keys per step where its float32
    logits tile stays within the 32 x 128 of the 16-bit decode tiles: the same K/V bytes per
    step and shared memory as the 16-bit tile, and half the softmax bookkeeping per key
    (FlashInfer's fp8 decode likewise keeps the bytes per load of its 16-bit one); measured on
    an H100 against 64-key fp8 tiles and other CTA counts (benchmarks/decisions/pallas.md). Prefill tiles, bound by the tensor cores, stay as they are.
    128-row configs carry a decode-sized body (``small_block_m``, the group's rows rounded up to
    16) for the tiles of a mixed batch whose rows fit it. A batch that would take 128-row tiles
    but whose median request fits that body (``median_qo_len``; mostly decodes beside a prefill,
    POD-Attention's shape) takes 64-row tiles with the body instead, for head_dim <= 128:
    4 warps hold two CTAs an SM where the 8-warp 128-row tile holds one, so one CTA's decode
    tiles stream K/V while the other's prefill tiles run their dots (POD-Attention, Kamath et
    al., arXiv 2410.18038: co-running the two on an SM; measured on an H100 against the 128-row
    config and against separate prefill and decode launches, benchmarks/decisions/pallas.md).
    ``page_size`` does not change the choice: the kernel gathers keys row by row through the page
    table, so a key step may span pages of any size (it is an argument so that a measured
    dependence can be added without changing callers).

    Raises:
      ValueError: ``head_dim`` is not a power of 2 in 16..256 or ``group_size > 128``.
    """
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of 2 in 16..256 for the pallas backend, got {head_dim}")
    if group_size > MAX_BLOCK_M:
        raise ValueError(f"num_qo_heads / num_kv_heads must be <= {MAX_BLOCK_M}, got {group_size}")
    rows = group_size * max(float(avg_qo_len), 1.0)
    block_m = min(MAX_BLOCK_M, max(MIN_DOT, next_pow2(int(rows + 0.999)), next_pow2(group_size)))
    if block_m <= 32:
        block_n = 128 if head_dim <= 64 else 64 if head_dim <= 128 else 32
        ctas = 3
        if kv_itemsize == 1 and block_m * block_n * 2 <= MAX_DECODE_LOGITS:
            # fp8 tiles take twice the keys per step (the bytes of a 16-bit step). With V loaded
            # as 16-bit pairs (attention._fp8_pairs_to_f16) they hold about 168 registers a
            # thread, so three CTAs fit an SM as for bf16 (the 4-CTA plan suited the
            # 255-register kernel before it: two resident, two even waves; measured on an H100,
            # benchmarks/decisions/pallas.md).
            block_n = block_n * 2
        # Measured on an H100 (benchmarks/decisions/pallas.md): 3 CTAs per SM beat 2 on skewed
        # batches (decode_zipf 2.78 vs 2.65 TB/s) and tie on uniform ones.
        return TileConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=3, ctas_per_sm=ctas)
    row64 = TileConfig(block_m=64, block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=3)
    if block_m == 64:
        return row64
    # Decode tiles run on a body of the group's rows rounded up to 16 in the same launch
    # (TileConfig.small_block_m): 128-row dots on a 4-row decode tile are 32x its MMA work.
    small = max(MIN_DOT, next_pow2(group_size))
    if median_qo_len is not None and median_qo_len * group_size <= small < row64.block_m and head_dim <= 128:
        return dataclasses.replace(row64, small_block_m=small)
    # 128-row tiles issue the next key step's q.k dot before the softmax (qk_ahead). Measured on
    # an H100 (benchmarks/decisions/pallas.md, pallas-2 run 2): prefill_causal 128x64, 8 warps,
    # 3 stages went 285 -> 307-311 TFLOP/s with it (4 stages: 299). 64-row tiles with it gave
    # 177 (237 without, an earlier run), so they keep the plain loop. Only the 8-warp tiles of
    # head_dim 64/128 take it (offline ptxas: 221/255 registers, no spills); head_dim 256
    # already spills without the extra logits tile, and 4-warp tiles (head_dim <= 32) would
    # go from 167 to 255 registers, unmeasured.
    return TileConfig(
        block_m=128,
        block_n=64 if head_dim <= 128 else 32,
        num_warps=8 if head_dim >= 64 else 4,
        num_stages=3 if head_dim <= 128 else 2,
        qk_ahead=head_dim in (64, 128),
        small_block_m=small if small < MAX_BLOCK_M else 0,
    )


def candidate_configs(kv_itemsize: int = 2) -> list[tuple[TileConfig, int]]:
    """Every ``(config, head_dim)`` pair :func:`heuristic_config` can return for KV elements of
    ``kv_itemsize`` bytes (for lowering tests)."""
    seen = {}
    for head_dim in (16, 32, 64, 128, 256):
        for page_size in (1, 16, 64, 128):
            for group_size in (1, 2, 4, 8, 16, 32, 64, 128):
                for qo in (1, 2, 4, 16, 64, 512):
                    for median_qo in (None, 1):
                        cfg = heuristic_config(head_dim, page_size, group_size, qo, kv_itemsize, median_qo)
                        seen.setdefault((cfg, head_dim), None)
    return sorted(seen, key=lambda c: (c[1], c[0].block_m, c[0].block_n))
