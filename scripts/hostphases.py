"""Where an engine step's time goes on the host, phase by phase (imported by the benchmark scripts beside it).

A decode step runs ahead of the host only as far as the host keeps up: once its own work per step (scheduling,
filling the step's buffers, launching, sampling, recording, detokenizing, streaming) exceeds the device's time,
the host is the bound. `HostPhases.attach(engine)` wraps the engine's parts on that one instance (the module
function `sample_start` while attached) and sums the seconds each spends:

    schedule   Scheduler.schedule
    fill       the step's host buffers and their copies: DecodeGraphRunner._fill, or build_batch for a plain step
    forward    DecodeGraphRunner.run less its fill (a graph replay: one launch; on the CPU: the forward itself),
               or the model's forward and logits in a plain step
    sample     sample_start (queues the choice and the copy of the tokens to host memory)
    wait       waiting for the device: the CUDA event behind the sampled tokens (0 on the CPU)
    collect    Engine._collect less its wait: the tokens read and recorded on their sequences
    text       Engine._finish_outputs: detokenizing, stop strings, streaming
    other      Engine.step less all of the above (inputs, advance, placeholders, bookkeeping)

The steps whose every chunk is a decode are also summed on their own (`per_decode_step`, what `decode_phases`
reports): prefill steps are left out. `host_s` is a step less what the device does: less `wait`, and on the
CPU (where the device is the host) less `forward` too. The wrappers cost about a microsecond per call, a few
per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

import loraledger.inference.engine as engine_module
from loraledger.inference.engine import Engine

PHASES: tuple[str, ...] = ("schedule", "fill", "forward", "sample", "wait", "collect", "text", "other")


class HostPhases:
    """Seconds per phase (see the module docstring), summed over the steps run while attached."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys((*PHASES, "step"), 0.0)  # over every step
        self.decode: dict[str, float] = dict.fromkeys((*PHASES, "step"), 0.0)  # over decode-only steps
        self.decode_steps = 0
        self._depth: dict[str, int] = {}
        self._scheduled: Any = None  # the SchedulerOutput of the step running

    def reset(self) -> None:
        for d in (self.seconds, self.decode):
            for k in d:
                d[k] = 0.0
        self.decode_steps = 0

    def _step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Engine.step, its seconds and its phases' added to `decode` too when every chunk it ran was a
        decode (one generated token)."""
        seconds, decode = self.seconds, self.decode

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before = dict(seconds)
            self._scheduled = None
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds["step"] += time.perf_counter() - t0
                out = self._scheduled
                if out is not None and out.chunks and out.num_decodes == len(out.chunks):
                    for k, v in seconds.items():
                        decode[k] += v - before[k]
                    self.decode_steps += 1

        return wrapped

    def _schedule(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        timed = self._timed("schedule", fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._scheduled = timed(*args, **kwargs)
            return self._scheduled

        return wrapped

    def _timed(self, key: str, fn: Callable[..., Any], inner: tuple[str, ...] = ()) -> Callable[..., Any]:
        """fn, adding its seconds to `key` less what the phases in `inner` spent inside it; a call made inside
        another call of the same key counts once."""
        seconds, depth = self.seconds, self._depth

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if depth.get(key):
                return fn(*args, **kwargs)
            before = sum(seconds[k] for k in inner)
            depth[key] = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[key] = 0
                seconds[key] += time.perf_counter() - t0 - (sum(seconds[k] for k in inner) - before)

        return wrapped

    def attach(self, engine: Engine) -> Callable[[], None]:
        """Wrap `engine`'s parts; returns the function that restores them."""
        restore: list[Callable[[], None]] = []

        def patch(obj: Any, name: str, key: str, inner: tuple[str, ...] = (), shared: bool = False) -> None:
            plain = getattr(obj, name)
            wrapper = {"step": self._step, "schedule": self._schedule}.get(key)
            setattr(obj, name, wrapper(plain) if wrapper else self._timed(key, plain, inner))
            # an attribute of a module or class is put back; one set on an instance is removed (its class's shows)
            restore.append((lambda: setattr(obj, name, plain)) if shared else (lambda: delattr(obj, name)))

        patch(engine.scheduler, "schedule", "schedule")
        patch(engine_module, "build_batch", "fill", shared=True)
        patch(engine_module, "sample_start", "sample", shared=True)
        patch(engine, "_collect", "collect", inner=("wait",))
        patch(engine, "_finish_outputs", "text")
        # a model call made inside the graph runner belongs to its "forward" already (the depth check)
        if engine.graphs is not None:
            patch(engine.graphs, "_fill", "fill")
            patch(engine.graphs, "run", "forward", inner=("fill",))
        patch(engine.model, "forward", "forward")
        patch(engine.model, "compute_logits", "forward")
        if torch.cuda.is_available():
            patch(torch.cuda.Event, "synchronize", "wait", shared=True)
        patch(engine, "step", "step")

        def detach() -> None:
            for undo in reversed(restore):
                undo()

        return detach

    def per_decode_step(self, device: torch.device) -> dict[str, float]:
        """Seconds per decode-only step of each phase, `other` and `host_s` (see the module docstring)."""
        if not self.decode_steps:
            raise ValueError("no decode-only step ran while attached")
        d = dict(self.decode)
        d["other"] = d["step"] - sum(d[k] for k in PHASES if k != "other")
        out = {k: v / self.decode_steps for k, v in d.items()}
        out["host_s"] = out["step"] - out["wait"] - (out["forward"] if device.type == "cpu" else 0.0)
        out["decode_steps"] = float(self.decode_steps)
        return out


def decode_phases(engine: Engine, run: Callable[[int], None], new_tokens: int, device: torch.device,
                  repeats: int = 3) -> dict[str, float]:
    """Per decode-only step of `engine` while `run(new_tokens)` generates new_tokens for each request of a fixed
    batch (its prefill steps are left out): the round with the fastest step of `repeats`."""
    phases = HostPhases()
    detach = phases.attach(engine)
    best: dict[str, float] | None = None
    try:
        for _ in range(repeats):
            phases.reset()
            run(new_tokens)
            per = phases.per_decode_step(device)
            if best is None or per["step"] < best["step"]:
                best = per
    finally:
        detach()
    assert best is not None
    return best
