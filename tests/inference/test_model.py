"""The runner against `transformers` on the same checkpoint: logits within 1e-4 (fp32) over one flat batch of
8 prompts, over decode steps, over a step mixing chunked prefill with decodes, and greedy tokens equal to
`generate`. Also the Llama-family variants (Qwen2 qkv bias, Qwen3 q/k norm, llama3/linear RoPE, tied
embeddings, Mistral) built tiny in the test, bf16 loading, and the LoRA hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from loraledger.inference.batch import BatchMetadata, SeqChunk, build_batch
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel
from loraledger.inference.tokenizer import Tokenizer

TOL = 1e-4
BLOCK_SIZE = 4
PROMPTS = (
    "",
    "Hi",
    "The engine keeps the memory of every sequence in small pages.",
    "A contributor does not need to trust the node that served the answers.",
    "Questions are welcome.",
    (
        "When two careful implementations agree, a reader can believe either one a little more, and "
        "when they do not, one of them is wrong."
    ),
    "héllo wörld 🙂",
    "Good tools are quiet.",
)


class GreedyDriver:
    """A minimal test loop around the runner: fixed shuffled block tables, one chunk per sequence per step."""

    def __init__(self, model: LlamaModel, num_blocks: int = 128, seed: int = 0) -> None:
        self.model = model
        self.cache = PagedKVCache.for_model(model.config, num_blocks, BLOCK_SIZE, dtype=model.dtype)
        gen = torch.Generator().manual_seed(seed)
        self.free: list[int] = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous tables
        self.tables: dict[int, tuple[int, ...]] = {}

    def add(self, seq_id: int, max_len: int) -> None:
        n = -(-max_len // BLOCK_SIZE)
        self.tables[seq_id], self.free = tuple(self.free[:n]), self.free[n:]

    def step(self, chunks: list[tuple[int, list[int], int]]) -> tuple[torch.Tensor, BatchMetadata]:
        """chunks: (seq_id, token ids, start position) -> (hidden [T, H], batch)."""
        batch = build_batch(
            [SeqChunk(s, tuple(ids), pos, self.tables[s]) for s, ids, pos in chunks], BLOCK_SIZE
        )
        batch.validate()
        return self.model(batch, self.cache), batch


def hf_logits(hf: nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' logits for one unpadded sequence: [len(ids), V] float32."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir: Path) -> nn.Module:
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    out = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in out}) == len(out), "prompts must have distinct lengths"
    return out


@pytest.fixture(scope="module")
def greedy_run(tiny_model: LlamaModel, prompts: list[list[int]]) -> dict[str, object]:
    """Prefill all 8 prompts in one flat batch, then 8 greedy decode steps (finished sequences leave)."""
    steps = 8
    driver = GreedyDriver(tiny_model)
    for i, p in enumerate(prompts):
        driver.add(i, len(p) + steps)
    hidden, batch = driver.step([(i, p, 0) for i, p in enumerate(prompts)])
    prefill_logits = [tiny_model.compute_logits(hidden[batch.query_start[i] : batch.query_start[i + 1]])
                      for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    done = [False] * len(prompts)
    last = tiny_model.compute_logits(hidden[batch.logits_indices])  # [B, V]
    decode_logits: list[dict[int, torch.Tensor]] = []
    running = list(range(len(prompts)))
    for _ in range(steps):
        for row, i in enumerate(running):
            seqs[i].append(int(last[row].argmax()))
            done[i] = seqs[i][-1] in tiny_model.config.eos_token_ids
        running = [i for i in running if not done[i]]
        if not running:
            break
        hidden, batch = driver.step([(i, [seqs[i][-1]], len(seqs[i]) - 1) for i in running])
        last = tiny_model.compute_logits(hidden[batch.logits_indices])
        decode_logits.append({i: last[row] for row, i in enumerate(running)})
    for row, i in enumerate(running):
        seqs[i].append(int(last[row].argmax()))
    return {"prefill": prefill_logits, "decode": decode_logits, "seqs": seqs, "steps": steps}


def test_prefill_of_8_prompts_in_one_batch_matches_transformers(
    hf_tiny: nn.Module, prompts: list[list[int]], greedy_run: dict[str, object]
) -> None:
    prefill: list[torch.Tensor] = greedy_run["prefill"]  # type: ignore[assignment]
    for i, p in enumerate(prompts):
        ref = hf_logits(hf_tiny, p)
        assert prefill[i].shape == ref.shape
        err = (prefill[i] - ref).abs().max().item()
        assert err < TOL, f"prompt {i} (len {len(p)}): max abs logit error {err}"


def test_decode_steps_match_transformers(
    hf_tiny: nn.Module, prompts: list[list[int]], greedy_run: dict[str, object]
) -> None:
    seqs: list[list[int]] = greedy_run["seqs"]  # type: ignore[assignment]
    decode: list[dict[int, torch.Tensor]] = greedy_run["decode"]  # type: ignore[assignment]
    assert len(decode) >= 4, "too few decode steps ran to be a test"
    refs = [hf_logits(hf_tiny, s) for s in seqs]  # causal: row j is what the prefix ids[: j + 1] predicts
    checked = 0
    for step, rows in enumerate(decode):
        for i, logits in rows.items():
            # this step fed the prompt and step + 1 generated ids: the last of them sits at len(prompt) + step
            err = (logits - refs[i][len(prompts[i]) + step]).abs().max().item()
            assert err < TOL, f"seq {i} decode step {step}: max abs logit error {err}"
            checked += 1
    assert checked >= 8 * 4


def test_greedy_tokens_equal_transformers_generate(
    hf_tiny: nn.Module, prompts: list[list[int]], greedy_run: dict[str, object]
) -> None:
    seqs: list[list[int]] = greedy_run["seqs"]  # type: ignore[assignment]
    steps: int = greedy_run["steps"]  # type: ignore[assignment]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_tiny.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=steps + 1, do_sample=False,
            )[0].tolist()
        assert seqs[i] == ref, f"prompt {i}: runner {seqs[i][len(p):]} vs transformers {ref[len(p):]}"


def test_mixed_step_chunked_prefill_and_decodes(
    tiny_model: LlamaModel, hf_tiny: nn.Module, prompts: list[list[int]]
) -> None:
    """Step 1: sequences 0, 1 send the first half of their prompt, 2, 3 their whole prompt.
    Step 2: 0, 1 send the second half while 2, 3 decode, interleaved in one batch."""
    p = [prompts[5], prompts[3], prompts[2], prompts[6]]
    driver = GreedyDriver(tiny_model, seed=1)
    for i, ids in enumerate(p):
        driver.add(i, len(ids) + 1)
    half = [len(p[0]) // 2, len(p[1]) // 2]
    h1, b1 = driver.step([(0, p[0][: half[0]], 0), (1, p[1][: half[1]], 0), (2, p[2], 0), (3, p[3], 0)])
    first = tiny_model.compute_logits(h1[b1.logits_indices])
    nxt = [int(first[2].argmax()), int(first[3].argmax())]
    h2, b2 = driver.step(
        [(2, [nxt[0]], len(p[2])), (0, p[0][half[0]:], half[0]), (3, [nxt[1]], len(p[3])), (1, p[1][half[1]:], half[1])]
    )
    assert b2.max_query_len > 1 and not b2.is_decode_only
    logits = tiny_model.compute_logits(h2)  # every token of step 2
    expect = [
        hf_logits(hf_tiny, p[2] + [nxt[0]])[-1:],
        hf_logits(hf_tiny, p[0])[half[0]:],
        hf_logits(hf_tiny, p[3] + [nxt[1]])[-1:],
        hf_logits(hf_tiny, p[1])[half[1]:],
    ]
    for k, ref in enumerate(expect):
        got = logits[b2.query_start[k] : b2.query_start[k + 1]]
        err = (got - ref).abs().max().item()
        assert err < TOL, f"chunk {k} of the mixed step: max abs logit error {err}"


COMMON_SIZES: dict[str, object] = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
    "initializer_range": 0.2,
}
VARIANTS: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    "qwen2_qkv_bias": (Qwen2Config, {}),
    "qwen3_qk_norm": (Qwen3Config, {"attention_bias": True}),
    "llama3_rope_tied": (LlamaConfig, {
        "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    }),
    "llama_linear_rope": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                            "factor": 2.0}}),
    "mistral": (MistralConfig, {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llama_family_variants_match_transformers(variant: str, tmp_path: Path) -> None:
    config_cls, extra = VARIANTS[variant]
    cfg = config_cls(**COMMON_SIZES, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1 in HF: make them matter
        for name, param in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="fp32")
    assert model.config.model_type == cfg.model_type
    if variant == "qwen2_qkv_bias":
        assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.o_proj.bias is None
    if variant == "llama3_rope_tied":
        assert model.lm_head.weight is model.embed_tokens.weight

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (11, 3, 20)]
    driver = GreedyDriver(model)
    for i, p in enumerate(prompts):
        driver.add(i, len(p) + 1)
    hidden, batch = driver.step([(i, p, 0) for i, p in enumerate(prompts)])
    logits = model.compute_logits(hidden)
    nxt = logits[batch.logits_indices].argmax(-1).tolist()
    hidden2, _ = driver.step([(i, [nxt[i]], len(p)) for i, p in enumerate(prompts)])
    decode = model.compute_logits(hidden2)
    for i, p in enumerate(prompts):
        ref = hf_logits(hf, p + [nxt[i]])
        err_prefill = (logits[batch.query_start[i] : batch.query_start[i + 1]] - ref[:-1]).abs().max().item()
        err_decode = (decode[i] - ref[-1]).abs().max().item()
        assert err_prefill < TOL and err_decode < TOL, f"{variant} seq {i}: {err_prefill}, {err_decode}"


def test_bf16_runner_tracks_fp32(tiny_model_dir: Path, tiny_model: LlamaModel, prompts: list[list[int]]) -> None:
    model = load_model(tiny_model_dir, dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    outs = []
    for m in (model, tiny_model):
        driver = GreedyDriver(m)
        driver.add(0, len(prompts[5]))
        hidden, _ = driver.step([(0, prompts[5], 0)])
        assert hidden.dtype == m.dtype
        outs.append(m.compute_logits(hidden))
    assert outs[0].dtype == torch.float32
    err = (outs[0] - outs[1]).abs().max().item()
    assert 0 < err < 0.5 * outs[1].std().item(), f"bf16 drifted from fp32 by {err}"


class DoubleOnAdapter(nn.Module):
    """A batch-aware replacement: y = base(x), doubled on tokens that carry any adapter slot >= 0."""

    takes_batch = True

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.calls = 0

    def forward(self, x: torch.Tensor, batch: BatchMetadata) -> torch.Tensor:
        self.calls += 1
        y = self.base(x)
        on = (batch.token_adapter_slots >= 0).any(dim=1).to(y.dtype)[:, None]  # [T, 1]; M may be 0
        return y * (1 + on)


def test_lora_hook_replaces_a_projection_and_sees_the_batch(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    names = model.named_linears()
    assert len(names) == 7 * model.config.num_layers
    assert "layers.1.self_attn.q_proj" in names and "layers.0.mlp.down_proj" in names
    hook = DoubleOnAdapter(names["layers.0.self_attn.v_proj"])  # type: ignore[arg-type]
    model.set_linear("layers.0.self_attn.v_proj", hook)
    with pytest.raises(KeyError, match="not a projection"):
        model.set_linear("layers.0.self_attn.rotary", hook)

    ids = (5, 6, 7, 8)
    cache = PagedKVCache.for_model(model.config, 4, BLOCK_SIZE)
    plain = build_batch([SeqChunk(0, ids, 0, (0,)), SeqChunk(1, ids, 0, (1,))], BLOCK_SIZE)
    adapted = build_batch(
        [SeqChunk(0, ids, 0, (2,)), SeqChunk(1, ids, 0, (3,), adapter_slots=(0,), adapter_scales=(1.0,))],
        BLOCK_SIZE,
    )
    h_plain = model(plain, cache)
    h_adapted = model(adapted, cache)
    assert hook.calls == 2
    assert torch.allclose(h_plain[:4], h_plain[4:]) and torch.allclose(h_adapted[:4], h_plain[:4])
    assert (h_adapted[4:] - h_plain[4:]).abs().max() > 1e-3, "the adapter-aware layer did not change its tokens"


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_cpu_logits_of_few_rows_equal_the_plain_projection(rows: int, tiny_model: LlamaModel) -> None:
    """compute_logits takes a blocked weight @ hidden^T path on the CPU for up to 64 rows (model.py): the same
    numbers as lm_head itself, across block edges (a vocabulary of 2.5 blocks); the model's own call too."""
    from loraledger.inference import model as model_module

    vocab = 2 * model_module._LOGITS_CPU_BLOCK + 700
    head = nn.Linear(96, vocab, bias=False)
    hidden = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        want = head(hidden)
        got = model_module._cpu_logits(hidden, head.weight)
    assert got.shape == (rows, vocab) and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    h = torch.randn(rows, tiny_model.config.hidden_size)
    with torch.inference_mode():
        assert torch.allclose(tiny_model.compute_logits(h), tiny_model.lm_head(h), rtol=1e-6, atol=1e-6)
