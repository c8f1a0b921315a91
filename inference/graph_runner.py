"""Fixed-shape decode steps, replayed as CUDA graphs: a decode step then costs its bytes, not its launches.

At batch 1 to 32, a decode step of a 1B-8B model issues hundreds of small kernels (about ten per layer, more
with LoRA), and launching them from Python takes longer than reading the weights. A CUDA graph records the
step once and replays it with one launch. A graph replays fixed shapes at fixed addresses, so every decode
step is padded to a bucket of P rows and written into static buffers:

    rows b < B    the step's sequences in chunk order, one query token each
    rows b >= B   padding: token 0 at position 0, its k/v written to the scratch slot (a KV block that no
                  sequence owns), context 1 (it attends to that slot only), no adapter; its logits are dropped

    input_ids[P], positions[P], slot_mapping[P], context_lens[P]    this step's values
    block_tables[P, W]     W = ceil(max_model_len / block_size) columns, so no table outgrows them
                           (these five int64 buffers are views of one, filled through a pinned host mirror)
    query_start = arange(P + 1), logits_indices = arange(P)         constant
    adapter slots / scales [M, P]   M merge columns (0: a base-only step), stored column-major so that each
                                    column the BGMV kernels read is contiguous

One graph per (P, M), captured on first use, all sharing one memory pool. Everything inside takes its work
from those tensors, never from host values that change from step to step: the Triton attention kernel reads
context_lens on the device (the torch backend gathers all W blocks and masks), and the LoRA layers run BGMV
over every column (rows whose slot is -1 return at once) with the rank grid spanning max_rank
(`loraledger.inference.lora.plan.static_lora_indices`, chosen by `BatchMetadata.static`).

Modes (`GRAPH_MODES`):

    "graphs"   capture on first use, then replay (CUDA only)
    "static"   the same padded fixed-shape step run eagerly: on the CPU it is the check of exactly what a graph
               replays (tests compare it with the unpadded step); it is slower than the plain step there
    "off"      no runner: every step is the plain `build_batch` step

A step qualifies when every chunk has one token (decodes, and one-token prefill chunks), B <= the largest
bucket and M <= `max_merge`; in "graphs" mode a step with adapters also needs the triton LoRA backend (the
torch backend plans on the host). Anything else runs the plain step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from loraledger.inference.batch import BatchMetadata, SeqChunk, adapter_runs
from loraledger.inference.errors import EngineConfigError
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.model import LlamaModel

GRAPH_MODES: tuple[str, ...] = ("off", "static", "graphs")
# Merge columns a graph is captured for; a request merging more adapters runs the plain step.
MAX_GRAPH_MERGE = 4


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes: 1, 2, 4, 8, then every multiple of 8, up to and including max_batch.

    e.g. 20 -> (1, 2, 4, 8, 16, 20); 32 -> (1, 2, 4, 8, 16, 24, 32). At most 7 padded rows above 8."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = [p for p in (1, 2, 4) if p < max_batch] + list(range(8, max_batch, 8))
    return tuple(sizes) + (max_batch,)


@dataclass
class _Graph:
    """One captured step: the graph, the batch whose buffers it reads, the logits buffer it writes."""

    graph: torch.cuda.CUDAGraph
    batch: BatchMetadata
    logits: torch.Tensor  # [P, vocab] float32


class DecodeGraphRunner:
    """Padded, fixed-shape decode steps over static buffers; captured as CUDA graphs in "graphs" mode."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKVCache,
        scratch_block: int,
        max_batch: int,
        max_model_len: int,
        mode: str,
        max_merge: int = MAX_GRAPH_MERGE,
    ) -> None:
        """`scratch_block`: a block of `kv_cache` outside the block manager's pool, the padding rows' slot."""
        if mode not in ("static", "graphs"):
            raise EngineConfigError(f"DecodeGraphRunner mode must be 'static' or 'graphs', got {mode!r}")
        if mode == "graphs" and model.device.type != "cuda":
            raise EngineConfigError(
                f"CUDA graphs need a CUDA device, the model is on {model.device}; use mode 'static' for the same "
                "fixed-shape step without capture"
            )
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(f"scratch block {scratch_block} outside the cache's {kv_cache.num_blocks} blocks")
        self.model = model
        self.kv_cache = kv_cache
        self.mode = mode
        self.max_merge = max_merge
        self.block_size = kv_cache.block_size
        self.buckets = bucket_sizes(max_batch)
        self.width = -(-max_model_len // self.block_size)  # W: block table columns
        self.scratch_slot = scratch_block * self.block_size
        self._scratch_block = scratch_block
        p, dev = self.buckets[-1], model.device
        # One int64 buffer: [last tokens | host ids | positions | slots | context lengths | token sources |
        # block tables], rows of P (tables P x W). All but the last tokens (written on the device by
        # `keep_tokens`) are mirrored on the host: a step's inputs go over in two copies, rows [P, 6P) and the
        # bucket's table rows. On CUDA the mirrors are pinned and the copies do not wait; there are two
        # mirrors, used in turn, so that filling the next step never writes one a queued copy has yet to read.
        # The step's input ids are gathered from the first 2P rows by the token sources, inside the graph: row
        # i reads last_tokens[r] when its token is the previous step's sample r (a step run ahead of the host,
        # `Engine` async_decode), else its host id (source P + i)
        self._meta = torch.zeros(6 * p + p * self.width, dtype=torch.int64, device=dev)
        pin = dev.type == "cuda"
        self._hosts = [torch.zeros(self._meta.shape, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host_arrays = [h.numpy() for h in self._hosts]  # numpy views of the mirrors, written row by row
        self._non_blocking = pin  # pinned host memory: the copies queue behind earlier work
        self._host_slots = [torch.full((max_merge, p), -1, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._host_scales = [torch.zeros(max_merge, p, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        # the block table each mirror's row i holds (None: padding or nothing yet): a sequence's table is one
        # tuple until it grows (`BlockManager`), so a row whose table is the same object needs no rewrite
        self._table_rows: list[list[tuple[int, ...] | None]] = [[None] * p for _ in range(2)]
        self._tokens = self._meta[0 : 2 * p]  # [2P]: last tokens, host ids
        self.last_tokens = self._meta[0:p]  # [P] the previous step's samples
        self.positions = self._meta[2 * p : 3 * p]  # [P]
        self.slot_mapping = self._meta[3 * p : 4 * p]  # [P]
        self.context_lens = self._meta[4 * p : 5 * p]  # [P]
        self.token_sources = self._meta[5 * p : 6 * p]  # [P] rows of `_tokens`
        self.block_tables = self._meta[6 * p :].view(p, self.width)  # [P, W]
        self.input_ids = torch.zeros(p, dtype=torch.int64, device=dev)  # [P] gathered by `_gather_ids`
        self.query_start = torch.arange(p + 1, dtype=torch.int32, device=dev)  # [P+1]
        self.logits_indices = torch.arange(p, dtype=torch.int64, device=dev)  # [P]
        self.adapter_slots = torch.full((max_merge, p), -1, dtype=torch.int32, device=dev)  # [Mmax, P]
        self.adapter_scales = torch.zeros(max_merge, p, dtype=torch.float32, device=dev)  # [Mmax, P]
        self._fill_padding(p, max_merge)
        for h in self._hosts:
            h.copy_(self._meta)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._batches: dict[tuple[int, int], BatchMetadata] = {}
        self._pool: Any = None  # torch.cuda.graph_pool_handle(), shared by every graph of the runner
        self._lora_contexts: list[object] | None = None  # the LoRA layers' shared contexts (found on first use)
        self.steps = 0  # steps run through this runner (replayed or eager)
        self.captures = 0

    # ---- which steps qualify ---------------------------------------------------------------------------
    def fits(self, chunks: list[SeqChunk]) -> bool:
        """True if this step can run here: one token per chunk, B <= the largest bucket, M <= max_merge, and in
        "graphs" mode adapters only on the triton LoRA backend."""
        if not chunks or len(chunks) > self.buckets[-1]:
            return False
        if any(len(c.token_ids) != 1 for c in chunks):
            return False
        m = max(len(c.adapter_slots) for c in chunks)
        if m > self.max_merge:
            return False
        return m == 0 or self.mode == "static" or self._lora_capturable()

    def _lora_capturable(self) -> bool:
        """Every LoRA layer of the model runs the triton backend (the torch backend plans from host values).
        The layers' shared contexts are found once; their backend is read each time (it can be switched)."""
        if self._lora_contexts is None:
            contexts: dict[int, object] = {}
            for mod in self.model.modules():
                if getattr(mod, "takes_batch", False):
                    ctx = getattr(mod, "context", None)  # a batch-aware layer without one: never captured
                    contexts[id(ctx)] = ctx
            self._lora_contexts = list(contexts.values())
        return all(getattr(ctx, "backend", None) == "triton" for ctx in self._lora_contexts)

    def bucket(self, batch_size: int) -> int:
        """The smallest bucket >= batch_size."""
        for p in self.buckets:
            if p >= batch_size:
                return p
        raise ValueError(f"batch of {batch_size} is over the largest bucket {self.buckets[-1]}")

    def warm_up(self, merges: tuple[int, ...] = (0, 1)) -> int:
        """Capture every bucket for each number of merged adapters in `merges` now (a node does it at start, so
        that no request waits for a capture), skipping what this runner cannot capture; returns the graphs
        captured. Nothing to do in "static" mode (0)."""
        if self.mode != "graphs":
            return 0
        before = self.captures
        for m in merges:
            if m > self.max_merge or (m > 0 and not (self._lora_capturable() and self._lora_contexts)):
                continue  # merged columns need LoRA layers, on the triton backend
            for p in self.buckets:
                if (p, m) not in self._graphs:
                    self._capture((p, m))
        return self.captures - before

    # ---- running ---------------------------------------------------------------------------------------
    def run(self, chunks: list[SeqChunk], token_sources: list[int] | None = None) -> torch.Tensor:
        """Run one qualifying step (see `fits`); returns the logits of its B rows [B, vocab] float32.

        `token_sources[i] >= 0`: row i's input token is `last_tokens[token_sources[i]]` (written on the device
        by `keep_tokens` after the previous step's sampling), not `chunks[i].token_ids[0]`.
        In "graphs" mode the result is a view of the graph's output buffer: use it before the next step."""
        b = len(chunks)
        p = self.bucket(b)
        m = max(len(c.adapter_slots) for c in chunks)
        key = (p, m)
        if self.mode == "graphs" and key not in self._graphs:
            self._capture(key)
        self._fill(chunks, p, m, token_sources)
        self.steps += 1
        if self.mode == "graphs":
            g = self._graphs[key]
            g.graph.replay()
            return g.logits[:b]
        runs = adapter_runs(chunks, list(range(b)), m)  # host runs: the torch LoRA backend plans from them
        batch = replace(self._static_batch(key), adapter_runs=runs)
        self._gather_ids(p)
        hidden = self.model(batch, self.kv_cache)  # [P, hidden]
        return self.model.compute_logits(hidden)[:b]  # every row, as the graph does

    def _gather_ids(self, p: int) -> None:
        """input_ids[:P] = the rows of [last tokens | host ids] the token sources name (one kernel)."""
        torch.index_select(self._tokens, 0, self.token_sources[:p], out=self.input_ids[:p])

    def _static_batch(self, key: tuple[int, int]) -> BatchMetadata:
        """The `BatchMetadata` of bucket P with M merge columns: views of the static buffers."""
        batch = self._batches.get(key)
        if batch is None:
            p, m = key
            batch = BatchMetadata(
                input_ids=self.input_ids[:p],
                positions=self.positions[:p],
                query_start=self.query_start[: p + 1],
                context_lens=self.context_lens[:p],
                block_tables=self.block_tables[:p],
                slot_mapping=self.slot_mapping[:p],
                logits_indices=self.logits_indices[:p],
                token_adapter_slots=self.adapter_slots[:m, :p].t(),  # [P, M], contiguous columns
                token_adapter_scales=self.adapter_scales[:m, :p].t(),
                block_size=self.block_size,
                max_query_len=1,
                max_context_len=self.width * self.block_size,
                adapter_runs=None,
                static=True,
            )
            self._batches[key] = batch
        return batch

    def keep_tokens(self, tokens: torch.Tensor) -> None:
        """Keep a step's sampled tokens [R] on the device, where the next step's `token_sources` point."""
        self.last_tokens[: tokens.shape[0]].copy_(tokens)

    def _fill(self, chunks: list[SeqChunk], p: int, m: int, token_sources: list[int] | None = None) -> None:
        """Write this step's rows into a host mirror, rows [B, P) as padding, and copy them over: rows [P, 6P)
        of the shared buffer and the bucket's P table rows (and the adapter columns when M > 0). Table columns
        past a row's own table keep earlier, valid block ids that no kernel reads (context_lens bounds them)
        and the torch backend masks."""
        bs, b, pmax = self.block_size, len(chunks), self.buckets[-1]
        turn = self._turn
        self._turn ^= 1
        host_t, host = self._hosts[turn], self._host_arrays[turn]
        pos = [c.start_pos for c in chunks]
        host[pmax : pmax + b] = [max(c.token_ids[0], 0) for c in chunks]  # a placeholder (-1) takes its source
        host[2 * pmax : 2 * pmax + b] = pos
        host[3 * pmax : 3 * pmax + b] = [c.block_table[q // bs] * bs + q % bs for c, q in zip(chunks, pos, strict=True)]
        host[4 * pmax : 4 * pmax + b] = [q + 1 for q in pos]
        own = range(pmax, pmax + b)  # row i's own host id
        host[5 * pmax : 5 * pmax + b] = own if token_sources is None else [
            r if r >= 0 else i for r, i in zip(token_sources, own, strict=True)]
        tables = host[6 * pmax :].reshape(pmax, self.width)
        written = self._table_rows[turn]
        for i, c in enumerate(chunks):
            table = c.block_table
            if written[i] is not table:
                tables[i, : len(table)] = table
                written[i] = table
        if b < p:  # padding rows: token 0 at position 0 into the scratch slot, context 1 on the scratch block
            host[pmax + b : pmax + p] = 0
            host[2 * pmax + b : 2 * pmax + p] = 0
            host[3 * pmax + b : 3 * pmax + p] = self.scratch_slot
            host[4 * pmax + b : 4 * pmax + p] = 1
            host[5 * pmax + b : 5 * pmax + p] = range(pmax + b, pmax + p)
            tables[b:p, 0] = self._scratch_block
            written[b:p] = [None] * (p - b)
        nb = self._non_blocking
        self._meta[pmax : 6 * pmax].copy_(host_t[pmax : 6 * pmax], non_blocking=nb)
        rows = slice(6 * pmax, 6 * pmax + p * self.width)
        self._meta[rows].copy_(host_t[rows], non_blocking=nb)
        if m:
            slots_t, scales_t = self._host_slots[turn], self._host_scales[turn]
            slots, scales = slots_t.numpy(), scales_t.numpy()
            slots[:m, :p] = -1
            scales[:m, :p] = 0.0
            for i, c in enumerate(chunks):
                k = len(c.adapter_slots)
                if k:
                    slots[:k, i] = c.adapter_slots
                    scales[:k, i] = c.adapter_scales
            # whole rows (contiguous on both sides, so the copy needs no pageable staging); the columns past P
            # are stale and unread by this bucket
            self.adapter_slots[:m].copy_(slots_t[:m], non_blocking=nb)
            self.adapter_scales[:m].copy_(scales_t[:m], non_blocking=nb)

    def _fill_padding(self, p: int, m: int) -> None:
        """Every row of bucket P padding (what the warm-up and capture run over: no real slot is written)."""
        pmax = self.buckets[-1]
        self._tokens[pmax : pmax + p].zero_()
        self.token_sources[:p].copy_(torch.arange(pmax, pmax + p, device=self.token_sources.device))
        self.input_ids[:p].zero_()
        self.positions[:p].zero_()
        self.slot_mapping[:p].fill_(self.scratch_slot)
        self.context_lens[:p].fill_(1)
        self.block_tables[:p].zero_()
        self.block_tables[:p, 0].fill_(self._scratch_block)
        self.adapter_slots[:m, :p].fill_(-1)
        self.adapter_scales[:m, :p].zero_()

    def _capture(self, key: tuple[int, int]) -> None:
        """Warm up (Triton compiles, cuBLAS picks its kernels) on a side stream, then record bucket P with M
        merge columns into a graph sharing the runner's memory pool. Runs over padding rows only."""
        p, m = key
        self._fill_padding(p, m)
        device = self.model.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._gather_ids(p)
                self.model.compute_logits(self.model(replace(self._static_batch(key)), self.kv_cache))
        torch.cuda.current_stream(device).wait_stream(side)
        # A fresh batch object: per-step state the layers cache by batch identity (the torch attention plan,
        # the LoRA indices) is then computed inside the capture, so the graph recomputes it on every replay.
        batch = replace(self._static_batch(key))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter store may copy weights on its own thread and stream meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._gather_ids(p)  # the input ids, from the host's or the previous step's samples
            logits = self.model.compute_logits(self.model(batch, self.kv_cache))  # [P, vocab]
        self._graphs[key] = _Graph(graph, batch, logits)
        self.captures += 1
