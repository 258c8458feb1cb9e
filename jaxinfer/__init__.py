"""jaxinfer: FlashInfer for JAX — paged-KV attention kernels, a load-balanced planner, and
FlashInfer's API as jit-compatible JAX functions.

Code written for FlashInfer runs after changing imports and ``torch`` to ``jax.numpy``: the
wrappers take FlashInfer's workspace buffer (unused) and its plan/run arguments; functions that
FlashInfer runs in place (``*_inplace``, ``append_paged_kv_cache``, ``merge_state_in_place``)
return their results instead, because JAX arrays are immutable. Bad input is a ``ValueError``
naming the argument; log-sum-exp values are base 2, as in FlashInfer.
"""

from jaxinfer.plan.batch import BatchSpec, PlanCapacity
from jaxinfer.cascade import (
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper,
    batch_cascade,
    cascade_levels_from_prefix_tree,
    merge_state,
    merge_state_in_place,
    merge_states,
)
from jaxinfer.decode import BatchDecodeWithPagedKVCacheWrapper, batch_decode, single_decode_with_kv_cache
from jaxinfer.mask import packbits, segment_packbits
from jaxinfer.page import append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from jaxinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlan, append_paged_mla_kv_cache, batch_mla
from jaxinfer.prefill import (
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    batch_prefill_paged,
    batch_prefill_ragged,
    single_prefill_with_kv_cache,
)
from jaxinfer import fp8, sampling
from jaxinfer.apply import apply
from jaxinfer.rope import (
    apply_llama31_rope,
    apply_llama31_rope_inplace,
    apply_llama31_rope_pos_ids,
    apply_llama31_rope_pos_ids_inplace,
    apply_rope,
    apply_rope_inplace,
    apply_rope_pos_ids,
    apply_rope_pos_ids_inplace,
    apply_rope_with_cos_sin_cache,
    apply_rope_with_cos_sin_cache_inplace,
    rope_quantize_fp8_append_paged_kv_cache,
)
from jaxinfer.sparse import BlockSparseAttentionWrapper, batch_block_sparse, bsr_to_dense, dense_to_bsr
from jaxinfer.variants import AttentionVariant, alibi_slopes
from jaxinfer.wrapper import Plan

__version__ = "0.1.0"

__all__ = [
    "apply",
    "AttentionVariant",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchMLAPagedAttentionWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "BatchSpec",
    "BlockSparseAttentionWrapper",
    "MLAPlan",
    "MultiLevelCascadeAttentionWrapper",
    "Plan",
    "PlanCapacity",
    "alibi_slopes",
    "append_paged_kv_cache",
    "append_paged_mla_kv_cache",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "batch_block_sparse",
    "batch_cascade",
    "batch_decode",
    "batch_mla",
    "batch_prefill_paged",
    "batch_prefill_ragged",
    "bsr_to_dense",
    "cascade_levels_from_prefix_tree",
    "dense_to_bsr",
    "fp8",
    "get_batch_indices_positions",
    "get_seq_lens",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "packbits",
    "segment_packbits",
    "rope_quantize_fp8_append_paged_kv_cache",
    "sampling",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
]
