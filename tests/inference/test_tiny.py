"""`init_tiny` / `loraledger model init-tiny`: files, determinism, size checks; the tokenizer wrapper on the
trained tokenizer: round trips, special ids, chat template, and streaming deltas that never split a character."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from loraledger.inference.errors import InvalidRequestError, ModelConfigError, ModelLoadError
from loraledger.inference.tiny import CHAT_TEMPLATE, init_tiny
from loraledger.inference.tokenizer import REPLACEMENT_CHAR, Tokenizer
from loraledger.node.cli import main as cli_main

TEXT = "Loraledger pays contributors — naïve café, 日本語, and an emoji 🙂 at the end!"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_checkpoint_files_and_config(tiny_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model_dir / name).is_file(), f"{name} missing"
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (2, 64, 4, 2, 128, 512, 512)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = init_tiny(tmp_path / "again")
    other = init_tiny(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again / name) == digest(tiny_model_dir / name), f"{name} differs for the same seed"
    assert digest(other / "model.safetensors") != digest(tiny_model_dir / "model.safetensors")
    assert digest(other / "tokenizer.json") == digest(tiny_model_dir / "tokenizer.json")


def test_refuses_bad_sizes_and_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="multiple of kv_heads"):
        init_tiny(tmp_path / "a", heads=4, kv_heads=3)
    with pytest.raises(ModelConfigError, match="vocab=100 is below 262"):
        init_tiny(tmp_path / "b", vocab=100)
    with pytest.raises(ModelConfigError, match="must split into 3 heads"):
        init_tiny(tmp_path / "c", hidden=64, heads=3, kv_heads=1)
    with pytest.raises(ModelConfigError, match="already holds a checkpoint"):
        init_tiny(tiny_model_dir)


def test_cli_init_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = cli_main(["model", "init-tiny", str(out), "--layers", "1", "--hidden", "32", "--heads", "2",
                   "--kv-heads", "1", "--intermediate", "48", "--vocab", "300", "--seed", "3"])
    assert rc == 0 and f"wrote tiny model to {out}" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (1, 32, 300)
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    assert cli_main(["model", "init-tiny", str(out)]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def test_tokenizer_round_trip_and_special_ids(tok: Tokenizer, tiny_model_dir: Path) -> None:
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token_ids == frozenset({2})
    assert tok.decode(ids) == TEXT
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.vocab_size == 512
    assert len(tok.encode("the contributors")) < len("the contributors"), "BPE learned no merges from the corpus"
    assert tok.decode(list(range(512)), skip_special_tokens=False)  # every id the model can emit decodes
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert hf(TEXT)["input_ids"] == ids


def test_chat_template(tok: Tokenizer) -> None:
    assert tok.has_chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Who wrote the data?"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<s><|user|>\nWho wrote the data?</s>\n<|assistant|>\n"
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(InvalidRequestError, match="'role' and 'content'"):
        tok.apply_chat_template([{"content": "no role"}])
    assert "add_generation_prompt" in CHAT_TEMPLATE


def test_decode_equals_transformers_decode(tok: Tokenizer, tiny_model_dir: Path) -> None:
    """The direct (Rust) decode path gives transformers' text, special tokens skipped or kept."""
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert tok._backend_decode is not None  # the tiny tokenizer is fast and does no space clean-up
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        ids = torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() + [tok.eos_token_id or 2]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_never_splits_a_character(tok: Tokenizer) -> None:
    prompt = tok.encode("Say:")
    ids = tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_id or 2]
    detok = tok.detokenizer(prompt)
    deltas = [detok.push(i) for i in ids]
    tail = detok.flush()
    assert "".join(deltas) + tail == TEXT == detok.text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "" in deltas[:-1], "expected a multi-byte character spread over several byte-level tokens"


def test_incremental_detokenizer_flushes_a_dangling_partial_character(tok: Tokenizer) -> None:
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    tail = detok.flush()
    assert tail and set(tail) == {REPLACEMENT_CHAR}


def test_streaming_in_rust_gives_the_python_windows_deltas(tiny_model_dir: Path) -> None:
    """A byte-level tokenizer streams through tokenizers' DecodeStream; every delta (and flush) must equal the
    Python window's, over random ids: partial and invalid UTF-8, special ids kept or skipped, a prompt as
    context (ending inside a character too). A flush ends the text."""
    rust = Tokenizer.from_pretrained(tiny_model_dir)
    python = Tokenizer.from_pretrained(tiny_model_dir)
    python._stream_backend = None  # the fallback other tokenizers take
    g = torch.Generator().manual_seed(3)
    # ids of single non-ASCII bytes (UTF-8 lead and continuation bytes): where a stream would meet partial and
    # invalid characters, and where a decoder that is not byte-level breaks DecodeStream's prefix check
    odd = torch.tensor([i for i in range(rust.vocab_size) if not rust.decode([i], skip_special_tokens=False).isascii()])
    assert len(odd) > 64
    for case in range(200):
        skip = case % 2 == 0
        pool = odd if case % 4 >= 2 else torch.arange(rust.vocab_size)
        prompt = pool[torch.randint(0, len(pool), (case % 7,), generator=g)].tolist()
        ids = pool[torch.randint(0, len(pool), (1 + case % 40,), generator=g)].tolist()
        a, b = rust.detokenizer(prompt, skip), python.detokenizer(prompt, skip)
        assert a._stream is not None and b._stream is None
        got_a, got_b = [a.push(i) for i in ids] + [a.flush()], [b.push(i) for i in ids] + [b.flush()]
        assert got_a == got_b, f"case {case}"
        assert a.text == b.text == "".join(got_a)
        for d in (a, b):
            assert d.flush() == ""
            with pytest.raises(RuntimeError, match="push after flush"):
                d.push(ids[0])


def test_tokenizer_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer in .*tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
