"""`EngineConfig`: everything an `Engine` needs at start-up, validated once when it is built.

The scheduler's bounds (`max_num_seqs`, `max_tokens_per_step`) are set here and checked by the
`SchedulerConfig` built from them (`SchedulerConfig.from_engine`); the engine hands that one to its scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraledger.inference.config import ModelConfig
from loraledger.inference.errors import EngineConfigError
from loraledger.inference.graph_runner import GRAPH_MODES
from loraledger.inference.kv_cache import bytes_per_block, num_blocks_for_budget
from loraledger.inference.quant import check_quantize_mode
from loraledger.inference.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs at start-up; validated once here.

    KV cache size (`kv_cache_blocks`): `num_blocks` if given, else `kv_cache_bytes`, else a default: on CUDA
    80% of the memory free after loading the model; on CPU room for `max_num_seqs` full contexts, capped at
    1 GiB.
    `max_model_len` caps the context below the model's own (None = the model's).
    """

    model_dir: str | Path
    dtype: str = "float32"
    device: str = "cpu"
    quantize: str = "none"  # "none" | "nf4": the base's projections in bitsandbytes 4-bit (QLoRA serving)
    block_size: int = 16
    kv_cache_bytes: int | None = None
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_tokens_per_step: int = 512
    attention_backend: str | None = None  # "torch" | "triton" | None = the device's default
    max_queue: int = 1024
    max_model_len: int | None = None
    seed: int = 0  # generator of unseeded sampled requests
    # "auto" | "off" | "static" | "graphs" (`loraledger.inference.graph_runner`): "auto" replays decode steps as CUDA
    # graphs on CUDA (unquantized base) and runs the plain step elsewhere; "static" is the same padded
    # fixed-shape step without capture (the CPU check of what a graph replays)
    decode_graphs: str = "auto"
    # intra-op threads torch uses on the background step thread (`start()`) on CPU. 1 by default: once another
    # thread (the one that loaded the model) has run a parallel torch op, every parallel region started from a
    # second thread pays a worker wake-up, which costs more than small ops gain from a second thread
    loop_cpu_threads: int = 1
    # when a step's text work (detokenizing, stop strings, streaming) runs: None = while the next step's
    # kernels run on CUDA, before the next step is scheduled on the CPU (see `loraledger.inference.engine`);
    # True / False force one
    overlap_text_work: bool | None = None
    # run each step before the previous step's tokens reach the host: the host schedules and builds step N+1
    # while the device runs step N, and each decode of N+1 takes its input token from N's samples on the
    # device. A row whose sequence ended at N (EOS, a stop id) is computed once more and dropped. None = on with
    # CUDA graphs, off elsewhere; True needs decode_graphs "static" or "graphs" (the graph runner keeps the
    # samples on the device), see `loraledger.inference.async_decode`
    async_decode: bool | None = None

    def __post_init__(self) -> None:
        try:
            check_quantize_mode(self.quantize)
        except ValueError as e:
            raise EngineConfigError(f"EngineConfig.quantize: {e}") from e
        for name in ("block_size", "max_queue", "loop_cpu_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        try:
            SchedulerConfig.from_engine(self)
        except EngineConfigError as e:
            raise EngineConfigError(f"EngineConfig.{e}") from e
        for name in ("kv_cache_bytes", "num_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EngineConfigError(
                    f"EngineConfig.{name} must be a positive integer or None, got {value!r}"
                )
        if self.async_decode is not None and not isinstance(self.async_decode, bool):
            raise EngineConfigError(f"EngineConfig.async_decode must be True, False or None, got {self.async_decode!r}")
        if self.async_decode and self.graph_mode == "off":
            raise EngineConfigError(
                "EngineConfig.async_decode=True runs fixed-shape decode steps ahead; it needs decode_graphs 'static' "
                f"or 'graphs' (or 'auto' on CUDA), got decode_graphs={self.decode_graphs!r} on {self.device!r}"
            )
        if self.overlap_text_work is not None and not isinstance(self.overlap_text_work, bool):
            raise EngineConfigError(
                f"EngineConfig.overlap_text_work must be True, False or None, got {self.overlap_text_work!r}"
            )
        if self.decode_graphs not in ("auto", *GRAPH_MODES):
            raise EngineConfigError(
                f"EngineConfig.decode_graphs must be one of auto, {', '.join(GRAPH_MODES)}; got {self.decode_graphs!r}"
            )
        if self.decode_graphs == "graphs" and not self.device.startswith("cuda"):
            raise EngineConfigError(
                f"EngineConfig.decode_graphs='graphs' needs a CUDA device, got device={self.device!r}; use 'static' "
                "for the same fixed-shape step without capture, or 'auto'"
            )
        if self.decode_graphs == "graphs" and self.quantize != "none":
            raise EngineConfigError(
                f"CUDA graphs are not supported over a {self.quantize} base yet; use decode_graphs='auto' or 'off'"
            )

    @property
    def graph_mode(self) -> str:
        """`decode_graphs` with "auto" resolved: "graphs" on CUDA over an unquantized base, else "off"."""
        if self.decode_graphs != "auto":
            return self.decode_graphs
        return "graphs" if self.device.startswith("cuda") and self.quantize == "none" else "off"


def kv_cache_blocks(
    config: EngineConfig, model: ModelConfig, max_model_len: int, dtype: torch.dtype, device: torch.device
) -> int:
    """KV blocks in the pool of an engine over `model` (see `EngineConfig`); on CUDA, call it after loading the
    model: the default takes 80% of the device memory free then."""
    if config.num_blocks is not None:
        return config.num_blocks
    budget = config.kv_cache_bytes
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.8)
        else:
            blocks_per_seq = -(-max_model_len // config.block_size)
            per_block = bytes_per_block(model, config.block_size, dtype)
            budget = min(config.max_num_seqs * blocks_per_seq * per_block, 1 << 30)
    return num_blocks_for_budget(model, config.block_size, budget, dtype)
