"""`TextStream`: the visible text of one generated sequence, token ids in, streamable text deltas out.

    stream = TextStream(tokenizer.detokenizer(prompt_ids), stop=("\\n\\n",))
    stream.push(token_id) -> True once a stop string appears (the text is cut just before it; it has ended)
    stream.flush()        -> the same for the detokenizer's held-back bytes (the text ends)
    stream.release(final) -> the text that may be streamed now: everything not yet released, less, unless
                             final, a tail that could still grow into a stop string
    stream.drop_held()    -> the text becomes what was released (a cancelled request's answer)

Contract: a delta never holds half a UTF-8 character (the detokenizer emits whole characters) nor text that
could become part of a stop string; concatenated, the released deltas equal `stream.text` once
`release(final=True)` has run. `text` never contains a stop string: it ends where the first one starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Detokenizer(Protocol):
    """Text deltas of a growing list of ids, each ending on a whole character
    (`loraledger.inference.tokenizer.IncrementalDetokenizer`)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextStream:
    """Detokenized text of one sequence, cut at its first stop string, released as it becomes safe to stream."""

    def __init__(self, detok: Detokenizer, stop: Sequence[str] = ()) -> None:
        self._detok = detok
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # visible text so far, cut before a stop string
        self.released = 0  # characters of `text` already released
        self.stopped = False  # a stop string was found: the text has ended

    def push(self, token_id: int) -> bool:
        """Add the text of one generated id; True if a stop string now appears (then or before)."""
        if self.stopped:
            return True
        return self._add(self._detok.push(token_id))

    def flush(self) -> bool:
        """End the text with what the detokenizer held back (an incomplete character comes out as U+FFFD);
        True if a stop string now appears (then or before)."""
        if self.stopped:
            return True
        return self._add(self._detok.flush())

    def _add(self, delta: str) -> bool:
        if not delta:
            return False
        if not self._max_stop:  # no stop strings: nothing to search
            self.text += delta
            return False
        start = max(0, len(self.text) - self._max_stop + 1)  # a stop string may start in the old text's tail
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def release(self, final: bool = False) -> str:
        """Text that can be streamed now: all not yet released when final, else all but the longest tail that
        is the start of a stop string."""
        end = len(self.text)
        if not final:
            for k in range(min(self._max_stop - 1, end), 0, -1):
                tail = self.text[end - k :]
                if any(s.startswith(tail) for s in self._stop):
                    end -= k
                    break
        out = self.text[self.released : end] if end > self.released else ""
        self.released = max(self.released, end)
        return out

    def drop_held(self) -> None:
        """Cut `text` to what was released: the answer of a request that ends without its held-back tail."""
        self.text = self.text[: self.released]
