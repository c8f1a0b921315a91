"""A thin wrapper over a local Hugging Face tokenizer: text <-> ids, special ids, chat template, streaming text.

The engine works on ids only; this module is the one place text enters and leaves. Streaming uses
`IncrementalDetokenizer`, which turns one new id at a time into a text delta and never emits half a UTF-8
character (byte-level BPE tokens can split one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers.decoders import ByteLevel

from loraledger.inference.errors import InvalidRequestError, ModelLoadError

REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence


def _decode_stream_class() -> Any:
    """tokenizers' `DecodeStream` where it takes a context of ids (`ids=`, tokenizers >= 0.22), else None:
    streaming then stays on the Python window (a machine may carry an older tokenizers than the lock)."""
    try:
        from tokenizers.decoders import DecodeStream

        DecodeStream(ids=[0], skip_special_tokens=True)
    except (ImportError, TypeError):
        return None
    return DecodeStream


DECODE_STREAM = _decode_stream_class()


class Tokenizer:
    """encode / decode / chat template of the tokenizer saved in a checkpoint directory."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Sequence[int] = ()) -> None:
        self._tok = hf_tokenizer
        # The streaming detokenizer decodes once per generated token of every sequence, so decode goes straight
        # to the Rust tokenizer where transformers would only forward to it: a fast tokenizer that applies no
        # clean-up of tokenization spaces (the Llama family's). The same text, without the Python layer.
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleans_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        self._backend_decode: Any = backend.decode if backend is not None and not cleans_up else None
        # A byte-level decoder (Llama 3, Qwen2/3, GPT-2 style BPE) decodes each id to its own bytes, so the text of
        # ids[:n + 1] always extends that of ids[:n] once that ends on a whole character: streaming can then run in
        # Rust (`DecodeStream`), whose check of exactly that cannot fail. Decoders that strip or replace text
        # (SentencePiece's) keep the Python window.
        byte_level = (DECODE_STREAM is not None and backend is not None and not cleans_up
                      and isinstance(backend.decoder, ByteLevel))
        self._stream_backend: Any = backend if byte_level else None
        eos = {int(i) for i in extra_eos_ids}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load `model_dir`'s tokenizer (tokenizer.json + tokenizer_config.json); eos ids also from
        generation_config.json / config.json where those list several. `ModelLoadError` if none is there."""
        from transformers import AutoTokenizer

        root = Path(model_dir)
        if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
            raise ModelLoadError(f"no tokenizer in {root}: expected tokenizer.json and tokenizer_config.json")
        try:
            hf = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the tokenizer in {root}: {e}") from e
        extra: list[int] = []
        for name in ("generation_config.json", "config.json"):
            path = root / name
            if path.is_file():
                eos = json.loads(path.read_text()).get("eos_token_id")
                extra.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return cls(hf, extra)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (special and added tokens included)."""
        return len(self._tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos id (see `eos_token_ids` for every id that ends a generation)."""
        return self._tok.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text -> ids (bos prepended when the tokenizer does so and `add_special_tokens`)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """ids -> text."""
        if self._backend_decode is not None:
            return str(self._backend_decode(list(ids), skip_special_tokens=skip_special_tokens))
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """[{"role": ..., "content": ...}, ...] -> prompt ids, rendered with the checkpoint's chat template.

        `InvalidRequestError` if the tokenizer has no chat template or a message lacks role/content."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template; send a plain prompt instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError(f"chat message {i} must be a dict with 'role' and 'content'")
        text = self._tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(str(text), add_special_tokens=False)

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one sequence whose prompt was `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Text deltas for a growing list of generated ids, each delta ending on a whole character.

    With a byte-level tokenizer each push is one call of the tokenizers library's `DecodeStream`, which keeps
    the same window in Rust (cheaper than the Python window below; the engine pushes one id per sequence per
    step). Other tokenizers, and `flush`, use the Python window: one decode per
    pushed id. The window ids[prefix:] is decoded; `_before` caches the decode of ids[prefix:read], the part
    already emitted (read sits on a character boundary):

        push(id) -> delta:  text = decode(ids[prefix:]);  if text ends in U+FFFD (an incomplete UTF-8
                            character) or adds nothing, emit nothing yet; else emit text[len(_before):],
                            read = len(ids), _before = text.
                            When the window grows past WINDOW_IDS, it slides: prefix = the previous read (a
                            boundary), _before = decode(ids[prefix:read]) (one extra decode every few ids).
        flush()  -> the rest (an incomplete character at the very end comes out as U+FFFD); the text ends
                    there (a later push raises).

    The window starts on the last few prompt ids, and always keeps the previously emitted ids as context, so
    that tokenizers which drop a leading space when a text starts with a word (SentencePiece) still give the
    right deltas. Concatenated deltas == decode(generated).
    """

    CONTEXT_IDS = 5
    WINDOW_IDS = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self.CONTEXT_IDS :]) if prompt_ids else []
        self._before = self._decode(self._ids) if self._ids else ""
        while self._ids and self._before.endswith(REPLACEMENT_CHAR):
            # prompt ids that end inside a character (ids sent as such): the context stops before it, so the
            # character's first bytes are not completed by generated ones into text the prompt half owns
            self._ids.pop()
            self._before = self._decode(self._ids) if self._ids else ""
        self._prefix = 0
        self._read = len(self._ids)
        self._last_read = self._read  # the read boundary before the latest emission: where a slide moves prefix
        self._emitted = ""
        self._flushed = False
        backend = tokenizer._stream_backend
        self._backend = backend
        self._stream = DECODE_STREAM(ids=self._ids, skip_special_tokens=skip_special_tokens) if backend else None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text it completes ("" while a character is still partial)."""
        if self._flushed:
            raise RuntimeError("push after flush: this detokenizer's text has ended; start a new one")
        token_id = int(token_id)
        self._ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id)
            if not delta:
                return ""
            # what flush() decodes from: the prefix stays within the last few ids, on a character boundary
            self._last_read, self._read = self._read, len(self._ids)
            if self._read - self._prefix > self.WINDOW_IDS:
                self._prefix = self._last_read
            self._emitted += delta
            return delta
        after = self._decode(self._ids[self._prefix :])
        if after.endswith(REPLACEMENT_CHAR) or len(after) <= len(self._before):
            return ""
        delta = after[len(self._before) :]
        self._last_read, self._read, self._before = self._read, len(self._ids), after
        if self._read - self._prefix > self.WINDOW_IDS:
            self._prefix = self._last_read
            self._before = self._decode(self._ids[self._prefix : self._read])
        self._emitted += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back: the end of generation (a push after it is an error)."""
        if self._flushed:
            return ""
        self._flushed = True
        if self._stream is not None:  # the Rust path keeps no `_before`: decode the emitted part now
            if self._read == len(self._ids):
                return ""
            self._before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        delta = after[len(self._before) :] if len(after) > len(self._before) else ""
        self._last_read = self._read = len(self._ids)
        self._before = after
        self._emitted += delta
        return delta
