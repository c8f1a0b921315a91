"""`train_adapter`: LoRA / QLoRA fine-tuning (peft) on datanets, writing a PEFT adapter and its lineage.

    records   = credited records of each datanet, in manifest order     # duplicates already dropped
    example   = [bos] + prompt_ids + completion_ids + [eos], truncated to max_seq_len
    labels    = -100 over bos + prompt, the ids elsewhere               # loss on completion (+ eos) only
    for epoch in range(epochs):
        order = torch.randperm(n, generator=Generator().manual_seed(seed * 1000 + epoch))
        for batch of batch_size in order: AdamW step on mean token cross-entropy (right-padded, masked)

Gradient accumulation (`grad_accum` = k > 1): one AdamW step per k consecutive micro-batches of the same order
(the last group of an epoch may be shorter); each micro-batch's mean loss is weighted by its share of the
group's completion tokens, so the step follows the token-mean cross-entropy of the whole group, as one batch of
k * batch_size would (up to float summation order). The training config records
`gradient_accumulation_steps` only when k > 1, so configs of runs without it keep their hash.

The base is loaded in float32 or bfloat16 (`dtype`; "auto" = bfloat16 on a CUDA device that supports it, else
float32; the LoRA weights themselves stay float32) for "lora", or in 4-bit nf4 through bitsandbytes ("qlora",
compute in `dtype`; runs on CPU). `device` "auto" = "cuda" when torch sees one, else "cpu". LoRA A is
initialised from `torch.manual_seed(seed)`, B at zero, dropout 0. During the run (set at train time, restored
after):

    torch.use_deterministic_algorithms(True); torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")                          # no TF32 on CUDA
    cuda only: CUBLAS_WORKSPACE_CONFIG=":4096:8" unless already set; eager attention (not SDPA's kernels)

Determinism. On CPU the same inputs, seed, thread count, library versions and CPU capability (AVX2 / AVX512
kernels) give the same weights bit for bit, hence the same weights hash (tested). On CUDA the same holds on the
same GPU class (compute capability), CUDA / cuDNN and library versions, with one caveat torch states itself:
CUBLAS_WORKSPACE_CONFIG only takes effect if no cuBLAS handle was created earlier in the process (train in a
fresh process). Not deterministic across: CPU vs CUDA, GPU classes, library versions, thread counts; the data
order is device-independent (a CPU generator). Everything on that list is in the training config (below), so
its hash, on chain, changes when any of it changes.

Output directory (written to a temp sibling and renamed at the end):

    adapter_config.json, adapter_model.safetensors   PEFT format (plain `PeftModel.from_pretrained` loads it)
    lineage.json                                     see `lineage_record`
    loss.png                                         loss per step (matplotlib, Agg canvas)

Lineage weights count each contributor's tokens that entered the model (prompt and completion ids inside the
truncated window, bos/eos excluded), once per example whatever the number of epochs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from loraledger.node.errors import ConfigError, NodeError
from loraledger.node.lineage.datanet import DatanetManifest, TokenCounter, credited_records, verify_manifest
from loraledger.node.types import Address

log = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
LOSS_PLOT_FILE = "loss.png"
LINEAGE_VERSION = 1
TRAINING_FORMAT = "loraledger.training.v2"
METHODS = ("lora", "qlora")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE_INDEX = -100

# Short target names of the Llama family -> module names peft matches.
TARGET_ALIASES: dict[str, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
CUBLAS_WORKSPACE = ":4096:8"  # what torch asks for deterministic cuBLAS
DATA_ORDER_RULE = (
    "credited records of each datanet in manifest order; each epoch e visits them in "
    "torch.randperm(n, generator=torch.Generator('cpu').manual_seed(seed * 1000 + e))"
)


class TrainingError(NodeError, RuntimeError):
    """A training run failed or produced an unusable adapter (e.g. no trainable example, lora_B left at
    zero)."""


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """ "q,k,v" or ["q_proj", ...] -> sorted unique module names; ConfigError for an unknown short name."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = set()
    for raw in items:
        t = raw.strip()
        if not t:
            continue
        if t in TARGET_ALIASES:
            names.add(TARGET_ALIASES[t])
        elif t in TARGET_ALIASES.values():
            names.add(t)
        else:
            raise ConfigError(
                f"unknown LoRA target {t!r}; use some of {','.join(TARGET_ALIASES)} "
                f"(or {','.join(TARGET_ALIASES.values())})"
            )
    if not names:
        raise ConfigError("no LoRA targets given; e.g. --targets q,k,v,o")
    return sorted(names)


@dataclass(frozen=True)
class TrainingArgs:
    """The hyper-parameters of one run, validated."""

    method: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    epochs: int
    lr: float
    seed: int
    max_seq_len: int
    batch_size: int
    grad_accum: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {self.dtype!r}")
        for name in ("rank", "epochs", "max_seq_len", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.max_seq_len < 3:
            raise ConfigError(f"max_seq_len must be at least 3 (bos, one token, eos), got {self.max_seq_len}")
        if not self.alpha > 0 or not self.lr > 0:
            raise ConfigError(f"alpha and lr must be positive, got alpha={self.alpha} lr={self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2**32-1, got {self.seed}")


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence and whose tokens it holds."""

    input_ids: list[int]
    labels: list[int]
    contributor: Address
    datanet: int  # index into the run's manifests
    content_tokens: int  # prompt + completion ids inside the window


@dataclass(frozen=True)
class TrainingResult:
    out_dir: Path
    lineage: dict[str, Any]
    losses: list[float]

    @property
    def weights_hash(self) -> str:
        return str(self.lineage["weights_hash"])


def _special_ids(base_dir: Path) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids from the checkpoint's config.json (pad falls back to eos; a list of eos ->
    first)."""
    try:
        cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{base_dir}: cannot read config.json ({e}); pass a Hugging Face checkpoint") from e

    def first(v: Any) -> int | None:
        if isinstance(v, list):
            return int(v[0]) if v else None
        return None if v is None else int(v)

    bos, eos, pad = (
        first(cfg.get("bos_token_id")),
        first(cfg.get("eos_token_id")),
        first(cfg.get("pad_token_id")),
    )
    if eos is None:
        raise ConfigError(f"{base_dir}: config.json has no eos_token_id; training needs one to end examples")
    return bos, eos, pad if pad is not None else eos


def build_examples(
    manifest_dirs: Sequence[Path], counter: TokenCounter, bos: int | None, eos: int, max_seq_len: int
) -> list[Example]:
    """Tokenize every credited record of every datanet (module docstring layout), in manifest order.

    Examples whose prompt fills the whole window (no completion token left to learn) are dropped with a
    warning.
    """
    examples: list[Example] = []
    dropped = 0
    for i, mdir in enumerate(manifest_dirs):
        for contributor, rec in credited_records(mdir):
            p, c = counter.record_ids(rec)
            head = [bos] if bos is not None else []
            ids = head + p + c + [eos]
            labels = [IGNORE_INDEX] * (len(head) + len(p)) + c + [eos]
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(x == IGNORE_INDEX for x in labels):
                dropped += 1
                continue
            content = min(len(p) + len(c), max(0, len(ids) - len(head)))
            examples.append(Example(ids, labels, contributor, i, content))
    if dropped:
        log.warning("%d examples dropped: their prompt fills max_seq_len=%d", dropped, max_seq_len)
    return examples


def collate(batch: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each [B, T] with T = longest example."""
    t = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), t), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _load_base(base_dir: Path, method: str, device: str, dtype: str = "float32") -> torch.nn.Module:
    """The base model: in `dtype` on CPU (moved to `device` after peft wraps it), or nf4 via bitsandbytes
    (compute in `dtype`) on `device`, prepared for k-bit training."""
    from transformers import AutoModelForCausalLM

    attn = _attention(device)
    if method == "lora":
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype], attn_implementation=attn)
    try:
        import bitsandbytes  # noqa: F401 - fail early with the fix when the quant extra is missing
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ConfigError("method 'qlora' needs bitsandbytes (pip install 'loraledger[quant]')") from e
    from peft import prepare_model_for_kbit_training

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=DTYPES[dtype],
        bnb_4bit_use_double_quant=False,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=quant,
        device_map={"": device},
        dtype=DTYPES[dtype],
        attn_implementation=attn,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def library_versions(method: str) -> dict[str, str]:
    """Versions of the libraries that shape the weights."""
    names = ["torch", "transformers", "peft", "tokenizers", "safetensors"] + (
        ["bitsandbytes"] if method == "qlora" else []
    )
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def _attention(device: str) -> str:
    """Attention implementation: SDPA on CPU (deterministic there), eager on CUDA (SDPA's flash / efficient
    backward kernels are not)."""
    return "sdpa" if device == "cpu" else "eager"


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a CUDA device, else "cpu"; anything else as `check_device` checks it."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def resolve_dtype(dtype: str, device: str) -> str:
    """ "auto" -> "bfloat16" on a CUDA device that supports it, else "float32"; "bfloat16" on a CUDA device
    without bf16 is a ConfigError."""
    if dtype == "auto":
        if device != "cpu" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "bfloat16" and device != "cpu" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use --dtype float32")
    return dtype


def check_device(device: str) -> str:
    """ "cpu" or "cuda" / "cuda:N", usable here; ConfigError otherwise."""
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked, but torch sees no CUDA device here")
        return device
    raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def device_class(device: str) -> dict[str, Any]:
    """What of the hardware shapes the weights: CPU architecture and kernel capability (AVX2 / AVX512 ...), or the
    GPU's name, compute capability and the CUDA / cuDNN versions torch runs."""
    if device == "cpu":
        return {
            "type": "cpu",
            "arch": platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(),
        }
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(device),
        "capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def determinism_settings(device: str, threads: int, dtype: str = "float32") -> dict[str, Any]:
    """The settings `train_adapter` runs under (module docstring)."""
    return {
        "deterministic_algorithms": True,
        "torch_threads": threads,
        "dtype": dtype,
        "float32_matmul_precision": "highest",
        "attention": _attention(device),
        "cublas_workspace_config": CUBLAS_WORKSPACE if device != "cpu" else None,
    }


def run_environment(method: str, device: str, threads: int, dtype: str = "float32") -> dict[str, Any]:
    """The software stack, device class and determinism settings of a run: the part of the training config a
    reproducer cannot choose, only match."""
    return {
        "software": library_versions(method),
        "device": device_class(device),
        "determinism": determinism_settings(device, threads, dtype),
    }


def training_config(
    args: TrainingArgs,
    base_hash: str,
    manifests: Sequence[DatanetManifest],
    tokenizer_sha256: str,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """The dict whose canonical-JSON sha256 is the training config hash: every input that shapes the
    weights, and the stack they were shaped on (`run_environment`)."""
    config: dict[str, Any] = {
        "format": TRAINING_FORMAT,
        "method": args.method,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": list(args.targets),
        "lora_dropout": 0.0,
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "batch_size": args.batch_size,
        "optimizer": {"name": "adamw", "betas": list(_ADAM_BETAS), "eps": _ADAM_EPS, "weight_decay": 0.0},
        "loss": "mean cross-entropy over completion tokens and eos",
        "quantization": {"type": "nf4", "compute_dtype": args.dtype, "double_quant": False}
        if args.method == "qlora"
        else None,
        "base_model_hash": base_hash,
        "tokenizer_sha256": tokenizer_sha256,
        "datanets": [{"name": m.name, "root": m.root} for m in manifests],
        "data_order": {"rule": DATA_ORDER_RULE, "seed": args.seed},
        "software": environment["software"],
        "device": environment["device"],
        "determinism": environment["determinism"],
    }
    if args.grad_accum > 1:  # absent means 1: configs of runs before accumulation existed keep their hash
        config["gradient_accumulation_steps"] = args.grad_accum
    return config


def _plot_losses(losses: Sequence[float], path: Path, title: str) -> None:
    """Loss per step as a PNG, drawn on a private Agg canvas (no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _check_lora_b(adapter_dir: Path) -> None:
    """TrainingError when the saved adapter has no lora_B tensor or one that is still all zero."""
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    bs = {k: v for k, v in tensors.items() if "lora_B" in k}
    if not bs:
        raise TrainingError(f"saved adapter has no lora_B tensors (keys: {sorted(tensors)[:4]}...)")
    zero = [k for k, v in bs.items() if not bool(torch.any(v != 0))]
    if zero:
        raise TrainingError(
            f"lora_B still zero after training in {zero[:3]} ({len(zero)} tensors): the adapter "
            "would change nothing; train longer or with a larger lr"
        )


def _run(
    model: torch.nn.Module, examples: list[Example], args: TrainingArgs, pad: int, device: str, progress: bool
) -> list[float]:
    """The optimisation loop (module docstring); returns the loss of every step."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=_ADAM_BETAS, eps=_ADAM_EPS, weight_decay=0.0)
    micro_per_epoch = (len(examples) + args.batch_size - 1) // args.batch_size
    steps_per_epoch = (micro_per_epoch + args.grad_accum - 1) // args.grad_accum
    losses: list[float] = []
    model.train()
    bar = tqdm(
        total=steps_per_epoch * args.epochs, desc=f"train {args.method}", unit="step", disable=not progress
    )
    try:
        for epoch in range(args.epochs):
            gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            order = torch.randperm(len(examples), generator=gen).tolist()
            for s in range(steps_per_epoch):
                first = s * args.grad_accum
                micro = [
                    [examples[j] for j in order[m * args.batch_size : (m + 1) * args.batch_size]]
                    for m in range(first, min(first + args.grad_accum, micro_per_epoch))
                ]
                if len(micro) == 1:  # no accumulation: the plain step (and its exact float path)
                    batch = {k: v.to(device) for k, v in collate(micro[0], pad).items()}
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise TrainingError(f"loss became {loss.item()} at epoch {epoch} step {s}; lower the lr")
                    loss.backward()
                    step_loss = float(loss.item())
                else:
                    step_loss = _accumulate(model, micro, pad, device, epoch, s)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
    return losses


def _target_tokens(rows: Sequence[Example]) -> int:
    """Tokens a batch's loss is the mean over: labels after the one-position shift that are not ignored."""
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in rows)


def _accumulate(
    model: torch.nn.Module, micro: Sequence[Sequence[Example]], pad: int, device: str, epoch: int, step: int
) -> float:
    """Backward over each micro-batch, its mean loss weighted by its share of the group's target tokens;
    returns the group's token-mean loss."""
    counts = [_target_tokens(rows) for rows in micro]
    total = sum(counts)
    group_loss = 0.0
    for rows, n in zip(micro, counts, strict=True):
        if n == 0:
            continue
        batch = {k: v.to(device) for k, v in collate(rows, pad).items()}
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at epoch {epoch} step {step}; lower the lr")
        (loss * (n / total)).backward()
        group_loss += float(loss.item()) * n / total
    return group_loss


def train_adapter(
    base_dir: str | os.PathLike[str],
    manifests: Sequence[str | os.PathLike[str]],
    method: str,
    rank: int,
    alpha: float,
    targets: str | Sequence[str],
    epochs: int,
    lr: float,
    seed: int,
    out_dir: str | os.PathLike[str],
    max_seq_len: int = 256,
    batch_size: int = 4,
    *,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    grad_accum: int = 1,
    dtype: str = "float32",
) -> TrainingResult:
    """Train a LoRA (or QLoRA) adapter of `base_dir` on the datanets at `manifests`; write it with its
    lineage.

    `device`: "cpu", "cuda", "cuda:N" or "auto"; `dtype`: "float32", "bfloat16" or "auto" (the base's dtype);
    `grad_accum`: micro-batches per optimizer step; `threads`: torch intra-op threads for the run (default:
    torch's current number); all are recorded in the training config. Each manifest is verified (file hashes,
    signatures, root) before use. Raises ConfigError for bad arguments, DatanetError for a bad datanet,
    TrainingError when training yields nothing usable. See the module docstring.
    """
    from peft import LoraConfig, get_peft_model

    from loraledger.inference.identity import base_model_hash, config_hash, weights_hash

    device = resolve_device(device)
    args = TrainingArgs(
        method,
        rank,
        float(alpha),
        tuple(parse_targets(targets)),
        epochs,
        float(lr),
        seed,
        max_seq_len,
        batch_size,
        grad_accum,
        resolve_dtype(dtype, device),
    )
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or threads <= 0:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    base = Path(base_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or remove it")
    mdirs = [Path(m) for m in manifests]
    if not mdirs:
        raise ConfigError("no datanet given; pass at least one --datanet MANIFEST_DIR")
    if len({p.resolve() for p in mdirs}) != len(mdirs):
        raise ConfigError("the same datanet is given twice")
    loaded = [verify_manifest(m) for m in mdirs]
    roots = [m.root for m in loaded]
    if len(set(roots)) != len(roots):
        raise ConfigError("two of the datanets have the same root (the same data twice)")

    counter = TokenCounter(base)
    for m, d in zip(loaded, mdirs, strict=True):
        if m.weight_unit == "tokens" and m.tokenizer_sha256 != counter.sha256:
            log.warning(
                "datanet %s was weighed with another tokenizer than %s's; lineage weights use the latter",
                d,
                base,
            )
    bos, eos, pad = _special_ids(base)
    examples = build_examples(mdirs, counter, bos, eos, args.max_seq_len)
    if not examples:
        raise TrainingError("no trainable example in the datanets (every prompt fills max_seq_len?)")
    base_hash = base_model_hash(base)
    cfg = training_config(
        args, base_hash, loaded, counter.sha256, run_environment(args.method, device, threads, args.dtype)
    )

    det_before = torch.are_deterministic_algorithms_enabled()
    rng_before = torch.random.get_rng_state()
    threads_before = torch.get_num_threads()
    precision_before = torch.get_float32_matmul_precision()
    cublas_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if device != "cpu" and cublas_before is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")
    try:
        torch.manual_seed(args.seed)
        model = _load_base(base, args.method, device, args.dtype)
        # peft annotates lora_alpha as int but computes scaling = alpha / r, which a float serves as well
        lora = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,  # type: ignore[arg-type]
            target_modules=list(args.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(args.seed)
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as e:
            raise ConfigError(f"LoRA targets {list(args.targets)} do not fit {base}: {e}") from e
        if args.method == "lora":
            peft_model.to(device)
        losses = _run(peft_model, examples, args, pad, device, progress)
    finally:
        torch.use_deterministic_algorithms(det_before)
        torch.random.set_rng_state(rng_before)
        torch.set_num_threads(threads_before)
        torch.set_float32_matmul_precision(precision_before)
        if device != "cpu" and cublas_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        peft_model.save_pretrained(str(tmp))
        _check_lora_b(tmp)
        lineage = lineage_record(
            base=base,
            base_hash=base_hash,
            manifests=loaded,
            manifest_dirs=mdirs,
            examples=examples,
            config=cfg,
            config_hash_value=config_hash(cfg),
            losses=losses,
            weights_hash_value=weights_hash(tmp),
            args=args,
        )
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
        _plot_losses(losses, tmp / LOSS_PLOT_FILE, f"{args.method} r={args.rank} on {len(examples)} examples")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log.info(
        "trained %s adapter %s: final loss %.4f, weights %s",
        args.method,
        out,
        losses[-1],
        lineage["weights_hash"],
    )
    return TrainingResult(out, lineage, losses)


def lineage_record(
    *,
    base: Path,
    base_hash: str,
    manifests: Sequence[DatanetManifest],
    manifest_dirs: Sequence[Path],
    examples: Sequence[Example],
    config: dict[str, Any],
    config_hash_value: str,
    losses: Sequence[float],
    weights_hash_value: str,
    args: TrainingArgs,
) -> dict[str, Any]:
    """The `lineage.json` document:

    {version, weights_hash, base_model_hash, base_model_dir, training_config, training_config_hash,
     datanets: [{name, root, datanet_id|null, chain_id|null, registry|null, manifest_dir, tokens_used,
                 contributors: {address: tokens}}],
     lineage_weights: [{contributor, tokens}]   # sorted by address, summed over datanets
     total_tokens, examples, steps, seed, final_loss, losses,
     library_versions,                           # = training_config.software
     registration: null}
    """
    per_datanet: list[dict[str, int]] = [defaultdict(int) for _ in manifests]  # type: ignore[misc]
    for e in examples:
        per_datanet[e.datanet][e.contributor] += e.content_tokens
    total: dict[str, int] = defaultdict(int)
    for counts in per_datanet:
        for a, n in counts.items():
            total[a] += n
    datanets = []
    for m, d, counts in zip(manifests, manifest_dirs, per_datanet, strict=True):
        reg = m.registration
        datanets.append(
            {
                "name": m.name,
                "root": m.root,
                "datanet_id": reg.datanet_id if reg else None,
                "chain_id": reg.chain_id if reg else None,
                "registry": reg.registry if reg else None,
                "manifest_dir": str(d.resolve()),
                "tokens_used": sum(counts.values()),
                "contributors": dict(sorted(counts.items(), key=lambda kv: kv[0].lower())),
            }
        )
    return {
        "version": LINEAGE_VERSION,
        "weights_hash": weights_hash_value,
        "base_model_hash": base_hash,
        "base_model_dir": str(base.resolve()),
        "training_config": config,
        "training_config_hash": config_hash_value,
        "datanets": datanets,
        "lineage_weights": [
            {"contributor": a, "tokens": n} for a, n in sorted(total.items(), key=lambda kv: kv[0].lower())
        ],
        "total_tokens": sum(total.values()),
        "examples": len(examples),
        "steps": len(losses),
        "seed": args.seed,
        "final_loss": losses[-1],
        "losses": list(losses),
        "library_versions": config["software"],
        "registration": None,
    }


def load_lineage(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read `adapter_dir/lineage.json` (or `adapter_dir` itself when it is a file); ConfigError naming the fix
    when it is missing or not JSON."""
    path = Path(adapter_dir) if Path(adapter_dir).is_file() else Path(adapter_dir) / LINEAGE_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no {LINEAGE_FILE}; it is written by `loraledger train`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not JSON ({e})") from e
    if not isinstance(d, dict) or d.get("version") != LINEAGE_VERSION:
        raise ConfigError(f"{path}: not a version-{LINEAGE_VERSION} lineage record")
    return d


def write_lineage(adapter_dir: str | os.PathLike[str], lineage: dict[str, Any]) -> Path:
    """Write `lineage.json` atomically (temp file + rename)."""
    path = Path(adapter_dir) / LINEAGE_FILE
    tmp = path.with_name(f".{LINEAGE_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
