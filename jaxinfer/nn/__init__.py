"""Flax (nnx) building blocks on jaxinfer: a KV-cache page pool and a paged attention layer."""

from jaxinfer.nn.attention import PagedAttention, StepBatch, StepPlanner, bucket
from jaxinfer.nn.kv_pool import KVCachePool, OutOfPagesError

__all__ = ["KVCachePool", "OutOfPagesError", "PagedAttention", "StepBatch", "StepPlanner", "bucket"]
