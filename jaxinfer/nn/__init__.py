"""Flax (nnx) building blocks on jaxinfer: a KV-cache page pool with a prefix cache, a paged
attention layer and the host planner of a serving step."""

from jaxinfer.nn.attention import PagedAttention, StepBatch, StepPlanner, bucket, row_buckets
from jaxinfer.nn.kv_pool import KVCachePool, OutOfPagesError

__all__ = ["KVCachePool", "OutOfPagesError", "PagedAttention", "StepBatch", "StepPlanner", "bucket", "row_buckets"]
