"""Attribution off the request path: a worker pool that attributes finished answers.

    pool = AttributionPool(workers=2)
    fut = pool.submit(completion_ids, [manifest_dir_a, manifest_dir_b])   # returns at once
    ...                                                                    # generation goes on
    attribution = fut.result()                                             # before committing the record

Indexes are opened (memory-mapped) once per folder and shared by the workers; the lookups are numpy gathers
and searches that spend most of their time outside the interpreter, and the pool is bounded, so a burst of
finished answers queues here instead of taking CPU from the engine's scheduling thread.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt

from loraledger.node.attribution.index import DatanetIndex, open_index
from loraledger.node.attribution.matcher import Attribution, MatcherConfig, attribute
from loraledger.node.errors import AttributionError

DatanetRef = str | os.PathLike[str] | DatanetIndex
"""A datanet to attribute against: its manifest (or index) folder, or an index already open."""


class AttributionPool:
    """A bounded thread pool plus an LRU cache of open indexes (at most `max_open` folders mapped at once).

    tokenizer_sha256: when given, indexes built with another tokenizer are refused (their token ids would not
    mean the same text as the engine's).
    """

    def __init__(
        self,
        workers: int = 1,
        cfg: MatcherConfig | None = None,
        tokenizer_sha256: str | None = None,
        max_open: int = 64,
    ) -> None:
        if workers < 1:
            raise AttributionError(f"an attribution pool needs at least one worker, got {workers}")
        if max_open < 1:
            raise AttributionError(f"max_open must be >= 1, got {max_open}")
        self.cfg = cfg or MatcherConfig()
        self.tokenizer_sha256 = tokenizer_sha256.lower() if tokenizer_sha256 else None
        self._max_open = max_open
        self._open: OrderedDict[str, DatanetIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attribution")

    def index(self, ref: DatanetRef) -> DatanetIndex:
        """The open index for a folder (opened on first use, kept in an LRU of `max_open`)."""
        if isinstance(ref, DatanetIndex):
            ix = ref
        else:
            key = str(Path(ref).resolve())
            with self._lock:
                cached = self._open.get(key)
                if cached is not None:
                    self._open.move_to_end(key)
                    return cached
            ix = open_index(key)
            with self._lock:
                self._open[key] = ix
                while len(self._open) > self._max_open:
                    self._open.popitem(last=False)
        if self.tokenizer_sha256 is not None and ix.tokenizer.lower() != self.tokenizer_sha256:
            raise AttributionError(
                f"datanet index {ix.label or ref!s} was built with tokenizer {ix.tokenizer or '(unnamed)'}, "
                f"the engine uses {self.tokenizer_sha256}: rebuild it with `loraledger datanet index`"
            )
        return ix

    def attribute_now(self, answer_ids: Sequence[int] | npt.NDArray[np.integer], datanets: Sequence[DatanetRef]) -> Attribution:
        """Attribute in the calling thread (what a worker runs)."""
        return attribute(answer_ids, [self.index(d) for d in datanets], self.cfg)

    def submit(
        self, answer_ids: Sequence[int] | npt.NDArray[np.integer], datanets: Sequence[DatanetRef]
    ) -> Future[Attribution]:
        """Queue the attribution of one finished answer against the adapter's datanets; returns a Future.

        The ids and the list are copied at once, so the caller may reuse its buffers.
        """
        ids = np.array(answer_ids, dtype=np.int64).reshape(-1)
        refs = list(datanets)
        if not refs:
            raise AttributionError("submit() needs at least one datanet (the adapter's training datanets)")
        return self._executor.submit(self.attribute_now, ids, refs)

    def close(self, wait: bool = True) -> None:
        """Stop accepting work; with wait, finish what is queued."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
