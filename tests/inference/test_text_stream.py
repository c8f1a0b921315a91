"""`TextStream`: stop strings found across token boundaries, held-back text released at the end, whole characters.

Most cases feed scripted text pieces (one piece per id) so each boundary is where the test puts it; the last ones
run the tiny checkpoint's byte-level tokenizer, whose ids split multi-byte characters.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from loraledger.inference.text_stream import TextStream
from loraledger.inference.tokenizer import REPLACEMENT_CHAR, Tokenizer


class Pieces:
    """A `Detokenizer` whose id i decodes to pieces[i]; `tail` is what flush emits (held-back bytes)."""

    def __init__(self, pieces: Sequence[str], tail: str = "") -> None:
        self.pieces = list(pieces)
        self.tail = tail

    def push(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        return self.tail


def run(pieces: Sequence[str], stop: Sequence[str], tail: str = "") -> tuple[TextStream, list[str], bool]:
    """Push every piece (stopping at a stop string) then flush; the stream, its deltas, whether it stopped."""
    stream = TextStream(Pieces(pieces, tail), stop)
    deltas: list[str] = []
    stopped = False
    for i in range(len(pieces)):
        stopped = stream.push(i)
        deltas.append(stream.release(final=stopped))
        if stopped:
            break
    if not stopped:
        stopped = stream.flush()
        deltas.append(stream.release(final=True))
    return stream, deltas, stopped


def test_without_stop_strings_every_piece_is_released_at_once() -> None:
    stream, deltas, stopped = run(["Hel", "lo", " world"], stop=())
    assert deltas == ["Hel", "lo", " world", ""] and stream.text == "Hello world" and not stopped


def test_stop_string_split_across_three_tokens_is_found_and_cut() -> None:
    stream, deltas, stopped = run(["The end", " is ", "ne", "ar", " now"], stop=["is near"])
    assert stopped and stream.text == "The end "
    assert "".join(deltas) == "The end "
    assert deltas[0] == "The end" and deltas[1] == " "  # "is " could start the stop string: held back
    assert all("is" not in d for d in deltas)


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop_string() -> None:
    stream = TextStream(Pieces(["ab", "<", "/", "x"]), stop=["</s>"])
    assert not stream.push(0) and stream.release() == "ab"
    assert not stream.push(1) and stream.release() == ""  # "<" may start "</s>"
    assert not stream.push(2) and stream.release() == ""  # "</" too
    assert not stream.push(3) and stream.release() == "</x"  # "</x" cannot: released
    assert stream.text == "ab</x"


def test_held_back_tail_is_released_at_the_end() -> None:
    stream = TextStream(Pieces(["answer: 4", "\n"]), stop=["\n\n"])
    assert not stream.push(0) and stream.release() == "answer: 4"
    assert not stream.push(1) and stream.release() == ""  # one newline may be the first of two
    assert not stream.flush()
    assert stream.release(final=True) == "\n" and stream.text == "answer: 4\n"


def test_stop_string_in_the_flushed_tail_cuts_it() -> None:
    stream, deltas, stopped = run(["x", "ST"], stop=["STOP"], tail="OP!")
    assert stopped and stream.text == "x" and "".join(deltas) == "x"


def test_earliest_stop_string_in_the_text_wins() -> None:
    stream, deltas, stopped = run(["abc", "def"], stop=["ef", "cd"])
    assert stopped and stream.text == "ab" and "".join(deltas) == "ab"


def test_stop_string_at_the_very_start() -> None:
    stream, deltas, stopped = run(["##", "rest"], stop=["##"])
    assert stopped and stream.text == "" and deltas == [""]


def test_after_a_stop_string_the_text_has_ended() -> None:
    stream = TextStream(Pieces(["a.", "b", "c"], tail="d"), stop=["."])
    assert stream.push(0) and stream.text == "a"
    assert stream.push(1) and stream.flush() and stream.text == "a"  # nothing is added after the stop
    assert stream.release(final=True) == "a"


def test_drop_held_keeps_only_what_was_released() -> None:
    stream = TextStream(Pieces(["done", " <"]), stop=["<end>"])
    stream.push(0)
    stream.push(1)
    assert stream.release() == "done " and stream.text == "done <"
    stream.drop_held()  # a cancelled request: its answer is what was streamed
    assert stream.text == "done " and stream.release(final=True) == ""


@pytest.mark.parametrize("seed", range(20))
def test_deltas_concatenate_to_the_text_and_never_show_a_stop_string(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab<>/ \n"
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(30)]
    stop = ["</a>", "\n\n", "b<b"][: rng.randint(0, 3)]
    stream, deltas, stopped = run(pieces, stop)
    full = "".join(pieces)
    assert "".join(deltas) == stream.text
    cut = min((i for i in (full.find(s) for s in stop) if i >= 0), default=len(full))
    assert stream.text == full[:cut] and stopped == (cut < len(full))
    released = ""
    for d in deltas:
        released += d
        assert not any(s in released for s in stop)


# ---- a real byte-level tokenizer: ids that split multi-byte characters -------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


TEXT = "Zoë said 日本語 is ✓ — naïve café"


def generated_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_multibyte_characters_are_never_split_across_deltas(tokenizer: Tokenizer) -> None:
    ids = generated_ids(tokenizer, TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # the tiny vocabulary splits characters into bytes
    stream = TextStream(tokenizer.detokenizer(), stop=())
    deltas = []
    for i in ids:
        assert not stream.push(i)
        deltas.append(stream.release())
    assert "" in deltas  # some id ended inside a character: nothing was released for it
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    stream.flush()
    deltas.append(stream.release(final=True))
    assert "".join(deltas) == TEXT == stream.text


def test_multibyte_stop_string_is_found_across_byte_tokens(tokenizer: Tokenizer) -> None:
    ids = generated_ids(tokenizer, TEXT)
    stream = TextStream(tokenizer.detokenizer(), stop=["本語"])
    deltas = []
    for i in ids:
        stopped = stream.push(i)
        deltas.append(stream.release(final=stopped))
        if stopped:
            break
    assert stopped and stream.text == "Zoë said 日" and "".join(deltas) == "Zoë said 日"


def test_incomplete_character_at_the_end_flushes_as_replacement(tokenizer: Tokenizer) -> None:
    ids = generated_ids(tokenizer, "ok 日")
    stream = TextStream(tokenizer.detokenizer(), stop=())
    for i in ids[:-1]:  # the last byte of 日 never arrives
        stream.push(i)
    stream.flush()
    out = stream.release(final=True)
    assert stream.text.startswith("ok ") and stream.text.endswith(REPLACEMENT_CHAR) and out
