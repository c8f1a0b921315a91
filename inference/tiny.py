"""`init_tiny`: write a small random Llama checkpoint and a byte-level BPE tokenizer, fully offline.

The embedded default model for `make run` and the tests (no hub is reachable). Output, in HF format:

    out_dir/config.json, model.safetensors, generation_config.json   LlamaForCausalLM.save_pretrained
    out_dir/tokenizer.json, tokenizer_config.json                     loadable with AutoTokenizer

The tokenizer is a byte-level BPE trained on `inference/data/corpus.txt` (shipped prose), vocabulary padded
with reserved special tokens up to exactly `vocab` so every id the model can emit decodes. Special tokens:
0 <pad>, 1 <s> (bos, prepended by encode), 2 </s> (eos), 3..5 chat roles. Same arguments + seed -> same bytes
of weights and the same tokenizer.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer

from loraledger.inference.errors import ModelConfigError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *ROLE_TOKENS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens

# messages -> "<s><|user|>\nHi</s>\n<|assistant|>\n" ; the model answers and ends with </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Weights are drawn N(0, INIT_STD): larger than HF's 0.02 so the random model's logits are far apart and
# greedy decoding is not a coin toss between near-equal tokens (tests compare greedy tokens exactly).
INIT_STD = 0.25


def corpus_text() -> str:
    """The shipped training prose for the tiny tokenizer."""
    return resources.files("loraledger.inference").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def _check_sizes(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 max_positions: int) -> None:
    sizes = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
             "intermediate": intermediate, "vocab": vocab, "max_positions": max_positions}
    bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0]
    if bad:
        raise ModelConfigError(f"tiny model sizes must be positive: {', '.join(bad)}")
    if hidden % heads != 0 or (hidden // heads) % 2 != 0:
        raise ModelConfigError(f"hidden={hidden} must split into {heads} heads of an even head_dim")
    if heads % kv_heads != 0:
        raise ModelConfigError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if vocab < MIN_VOCAB:
        raise ModelConfigError(f"vocab={vocab} is below {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} specials)")


def train_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab` ids trained on `corpus_text()`."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    missing = vocab - tok.get_vocab_size()
    if missing > 0:  # the corpus ran out of merges: fill with reserved ids so every model id decodes
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def init_tiny(
    out_dir: str | Path,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 512,
    max_positions: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random LlamaForCausalLM (float32) and its tokenizer to `out_dir`; returns the directory.

    Refuses (`ModelConfigError`) to write over an existing config.json unless `overwrite`.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _check_sizes(layers, hidden, heads, kv_heads, intermediate, vocab, max_positions)
    out = Path(out_dir)
    if (out / "config.json").exists() and not overwrite:
        raise ModelConfigError(f"{out} already holds a checkpoint (config.json); choose another directory "
                               "or overwrite it explicitly (--force)")
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(vocab)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        model_max_length=max_positions,
    )
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
        with torch.no_grad():  # HF initialises norms to 1; jitter them so a wrong norm would show in tests
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    return out
