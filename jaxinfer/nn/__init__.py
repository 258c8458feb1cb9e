"""Flax (nnx) building blocks on jaxinfer: a KV-cache page pool with a prefix cache, a paged
attention layer and the host planner of a serving step, and DeepSeek's multi-head latent attention
layer."""

from jaxinfer.nn.attention import PagedAttention, StepBatch, StepPlanner, bucket, row_buckets
from jaxinfer.nn.kv_pool import KVCachePool, OutOfPagesError
from jaxinfer.nn.mla import MLAConfig, MLAStep, MultiHeadLatentAttention, plan_mla_step

__all__ = ["KVCachePool", "MLAConfig", "MLAStep", "MultiHeadLatentAttention", "OutOfPagesError", "PagedAttention",
           "StepBatch", "StepPlanner", "bucket", "plan_mla_step", "row_buckets"]
