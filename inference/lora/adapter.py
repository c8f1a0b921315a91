"""Parse and validate a PEFT LoRA adapter directory into per-(layer, module) weights ready for the slot stacks.

A PEFT adapter dir holds `adapter_config.json` and `adapter_model.safetensors` with keys like

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

PEFT computes `lora_B(lora_A(x)) * scaling`, scaling = alpha / r (or alpha / sqrt(r) with `use_rslora`), with r
and alpha per module from `rank_pattern` / `alpha_pattern` (a pattern key matches a module path when the path
ends with it at a dot boundary, as `re.match(rf"(.*\\.)?({key})$", path)`; first key wins, as in PEFT).
We store A = lora_A.T ([in, r]) and B = lora_B.T * scaling ([r, out]) so a token computes `x @ A @ B`: the
scaling is folded in when the adapter is read, once, as the slots hold it (no pass over B per slot fill).

Refused with `AdapterFormatError` (nothing is loaded): missing/malformed files, a peft_type other than LORA,
bias != "none", DoRA, lora_bias, modules_to_save that carry weights, other PEFT extensions, keys that are not
LoRA A/B of the seven Llama projections, a layer or shape that does not fit the base, a rank over `max_rank`.
Refused with `AdapterMismatchError`: a weights hash or base model hash other than the expected one.
`fan_in_fan_out` only matters for GPT-2 style Conv1D layers; PEFT itself forces it off for nn.Linear (every
Llama projection), so it is accepted and has no effect here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraledger.inference.errors import AdapterFormatError, AdapterMismatchError
from loraledger.inference.identity import ADAPTER_WEIGHTS_FILE, ContentHash, parse_hash, tensors_hash

CONFIG_FILE = "adapter_config.json"
LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_PARENT = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in LORA_MODULES}
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>(?:[\w]+\.)*layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\."
    r"(?P<module>\w+))\.lora_(?P<ab>[AB])\.weight$"
)
# options of LoraConfig that change the computation in a way this engine does not implement
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")
_UNSUPPORTED_SET = ("layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens")


@dataclass(frozen=True)
class BaseDims:
    """The shapes LoRA weights must fit: (in, out) of each projection and the number of layers."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int

    @classmethod
    def from_model_config(cls, config: Any) -> BaseDims:
        """From `loraledger.inference.config.ModelConfig` (num_layers, hidden_size, intermediate_size, q_size, kv_size)."""
        return cls(
            num_layers=int(config.num_layers),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            q_size=int(config.q_size),
            kv_size=int(config.kv_size),
        )

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of projection `module`."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        if module not in shapes:
            raise KeyError(f"{module!r} is not a LoRA target; supported: {', '.join(LORA_MODULES)}")
        return shapes[module]


def module_name(layer: int, module: str) -> str:
    """'layers.{layer}.{self_attn|mlp}.{module}': the name `LlamaModel.named_linears()` uses."""
    return f"layers.{layer}.{_MODULE_PARENT[module]}.{module}"


def _pattern_key(keys: list[str], path: str) -> str | None:
    """First pattern key that matches the end of `path` at a dot boundary (PEFT's get_pattern_key)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of `adapter_config.json` that shape the computation, validated."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False

    def rank_for(self, path: str) -> int:
        """r of the module at `path` (e.g. 'model.layers.0.mlp.down_proj'): rank_pattern, else r."""
        key = _pattern_key(list(self.rank_pattern), path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        key = _pattern_key(list(self.alpha_pattern), path)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, path: str) -> float:
        """alpha / sqrt(r) with use_rslora, else alpha / r (PEFT's LoraLayer.update_layer)."""
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, path: str) -> bool:
        """PEFT's rule: a regex string must fullmatch the path; a list entry must equal it or end it after a dot."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.target_modules)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "adapter_config.json") -> AdapterConfig:
        """Validate a parsed adapter_config.json; AdapterFormatError names the offending field."""

        def bad(msg: str) -> AdapterFormatError:
            return AdapterFormatError(f"{where}: {msg}")

        if raw.get("peft_type", "LORA") != "LORA":
            raise bad(f"peft_type {raw.get('peft_type')!r} is not supported; only LoRA adapters are served")
        if raw.get("bias", "none") != "none":
            raise bad(f"bias={raw.get('bias')!r} is not supported; train with bias='none'")
        for name in _UNSUPPORTED_TRUE:
            if raw.get(name):
                raise bad(f"{name}=true is not supported by the multi-LoRA kernels; train without it")
        for name in _UNSUPPORTED_SET:
            if raw.get(name):
                raise bad(f"{name}={raw.get(name)!r} is not supported; train without it")
        r = raw.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise bad(f"r must be a positive integer, got {r!r}")
        alpha = raw.get("lora_alpha", r)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise bad(f"lora_alpha must be a positive number, got {alpha!r}")
        targets = raw.get("target_modules")
        if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            target_modules: tuple[str, ...] | str = tuple(targets)
        elif isinstance(targets, str) and targets:
            try:
                re.compile(targets)
            except re.error as e:
                raise bad(f"target_modules regex {targets!r} does not compile: {e}") from e
            target_modules = targets
        else:
            raise bad(f"target_modules must be a non-empty list of names or a regex string, got {targets!r}")
        patterns: list[dict[str, Any]] = []
        for name in ("rank_pattern", "alpha_pattern"):
            pat = raw.get(name) or {}
            if not isinstance(pat, dict):
                raise bad(f"{name} must be an object of pattern -> number, got {pat!r}")
            for k, v in pat.items():
                ok_int = isinstance(v, int) and not isinstance(v, bool) and v > 0
                ok_num = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                if not (ok_int if name == "rank_pattern" else ok_num):
                    raise bad(f"{name}[{k!r}] must be a positive {'integer' if name == 'rank_pattern' else 'number'}")
            patterns.append(dict(pat))
        base = raw.get("base_model_name_or_path")
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=target_modules,
            rank_pattern=patterns[0],
            alpha_pattern=patterns[1],
            base_model_name_or_path=str(base) if base is not None else None,
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        )


def read_adapter_config(adapter_dir: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """(validated config, raw dict) of `<adapter_dir>/adapter_config.json`."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{adapter_dir}: no {CONFIG_FILE}; an adapter dir needs it (PEFT format)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return AdapterConfig.from_dict(raw, where=str(path)), raw


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One adapted projection: `x @ A @ B`, A = lora_A.T: [in, r], B = lora_B.T * scaling: [r, out] (contiguous,
    compute dtype). `scaling` is the factor already in B, kept for reference."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


@dataclass
class LoRAAdapter:
    """A validated adapter: its weights per module name ('layers.0.self_attn.q_proj'), hash and config."""

    path: Path
    config: AdapterConfig
    weights_hash: ContentHash
    modules: dict[str, LoRAModuleWeights]

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(w.A.nbytes + w.B.nbytes for w in self.modules.values())


def load_adapter(
    adapter_dir: str | Path,
    dims: BaseDims,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    expected_weights_hash: str | None = None,
    expected_base_hash: str | None = None,
    base_hash: str | None = None,
    pin_memory: bool = False,
) -> LoRAAdapter:
    """Read, verify and validate a PEFT adapter dir into CPU tensors of `dtype`, all views of one buffer (in
    pinned memory with `pin_memory`, for asynchronous copies to the GPU).

    Errors come in this order: config (format) -> tensors (format) -> weights hash vs `expected_weights_hash`
    and `expected_base_hash` vs the engine's `base_hash` (mismatch) -> keys, layers, shapes, ranks, values
    (format). Nothing is half-loaded: the caller gets a complete adapter or an error.

    The hash runs before the layout, not on a thread beside it: there it takes a core that one of torch's
    intra-op threads waits on, and the layout's many small parallel copies slow down more than the overlap saves.
    """
    root = Path(adapter_dir)
    config, raw = read_adapter_config(root)
    wpath = root / ADAPTER_WEIGHTS_FILE
    if not wpath.is_file():
        raise AdapterFormatError(f"{root}: no {ADAPTER_WEIGHTS_FILE} (only safetensors adapters are served)")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{wpath}: not a readable safetensors file ({e})") from e
    try:
        actual = tensors_hash(tensors)
    except ValueError as e:  # a dtype the canonical framing has no name for
        raise AdapterFormatError(f"{wpath}: cannot hash the adapter weights: {e}") from e
    if expected_weights_hash is not None and actual != parse_hash(expected_weights_hash):
        raise AdapterMismatchError(
            f"{root}: weights hash {actual} differs from the expected {expected_weights_hash}; the files are not "
            "the registered adapter"
        )
    if expected_base_hash is not None and base_hash is not None and parse_hash(expected_base_hash) != parse_hash(
        base_hash
    ):
        raise AdapterMismatchError(
            f"{root}: adapter was trained for base model {expected_base_hash} but this engine serves {base_hash}"
        )
    modules = _parse_modules(root, config, tensors, dims, max_rank, dtype, bool(raw.get("modules_to_save")),
                             pin_memory)
    return LoRAAdapter(path=root, config=config, weights_hash=actual, modules=modules)


def _parse_modules(
    root: Path,
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    dims: BaseDims,
    max_rank: int,
    dtype: torch.dtype,
    has_modules_to_save: bool,
    pin_memory: bool = False,
) -> dict[str, LoRAModuleWeights]:
    """Check every module's tensors, then write A = lora_A.T and B = lora_B.T * scaling in `dtype` into views of
    one buffer (one allocation, one pass over the bytes), and check the values are finite."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    paths: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            if "modules_to_save" in key or has_modules_to_save:
                raise AdapterFormatError(
                    f"{root}: tensor {key!r} belongs to modules_to_save (fully trained modules); only LoRA A/B "
                    "weights can be served over a shared base"
                )
            if "lora_magnitude_vector" in key:
                raise AdapterFormatError(f"{root}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
            raise AdapterFormatError(
                f"{root}: unexpected tensor {key!r}; expected '...layers.N.(self_attn|mlp).<proj>.lora_(A|B).weight'"
            )
        module, layer = m["module"], int(m["layer"])
        if module not in LORA_MODULES:
            raise AdapterFormatError(f"{root}: {key!r} adapts {module!r}; supported: {', '.join(LORA_MODULES)}")
        if layer >= dims.num_layers:
            raise AdapterFormatError(f"{root}: {key!r} names layer {layer} but the base has {dims.num_layers} layers")
        if not t.is_floating_point():
            raise AdapterFormatError(f"{root}: {key!r} has dtype {t.dtype}; LoRA weights must be floating point")
        pairs.setdefault((layer, module), {})[m["ab"]] = t
        paths[(layer, module)] = m["path"]
    if not pairs:
        raise AdapterFormatError(f"{root}: {ADAPTER_WEIGHTS_FILE} holds no LoRA weights")
    checked: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
    for (layer, module), ab in sorted(pairs.items()):
        name = module_name(layer, module)
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{root}: {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        path = paths[(layer, module)]
        if not config.targets(path):
            raise AdapterFormatError(f"{root}: {name} has weights but target_modules {config.target_modules!r} "
                                     "does not select it")
        fan_in, fan_out = dims.module_shape(module)
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise AdapterFormatError(
                f"{root}: {name} shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not fit the base "
                f"projection ({fan_in} -> {fan_out}); expected [r, {fan_in}] and [{fan_out}, r]"
            )
        if r > max_rank:
            raise AdapterFormatError(
                f"{root}: {name} has rank {r}, over the configured max_rank {max_rank}; raise max_rank or "
                "retrain at a lower rank"
            )
        if r != config.rank_for(path):
            raise AdapterFormatError(
                f"{root}: {name} has rank {r} but adapter_config.json gives r={config.rank_for(path)}"
            )
        checked.append((name, a, b, config.scaling_for(path)))
    return _lay_out(root, checked, dtype, pin_memory)


_ALIGN_BYTES = 64  # each view starts on a cache line (and a 16-byte boundary, as Triton's loads prefer)


def _lay_out(root: Path, checked: list[tuple[str, torch.Tensor, torch.Tensor, float]], dtype: torch.dtype,
             pin_memory: bool) -> dict[str, LoRAModuleWeights]:
    """A: [in, r] and B * scaling: [r, out] of each module as views of one buffer of `dtype` (gaps zeroed)."""
    step = max(1, _ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size())
    offsets: list[tuple[int, int]] = []
    end = 0
    for _, a, b, _ in checked:
        off_a = end
        off_b = -(-(off_a + a.numel()) // step) * step
        end = -(-(off_b + b.numel()) // step) * step
        offsets.append((off_a, off_b))
    flat = torch.empty(end, dtype=dtype, pin_memory=pin_memory)
    out: dict[str, LoRAModuleWeights] = {}
    filled = 0
    for (name, a, b, scaling), (off_a, off_b) in zip(checked, offsets, strict=True):
        r = a.shape[0]
        A = flat[off_a : off_a + a.numel()].view(a.shape[1], r)
        B = flat[off_b : off_b + b.numel()].view(r, b.shape[0])
        if off_a > filled:
            flat[filled:off_a].zero_()
        A.copy_(a.t())  # transposed and converted to `dtype` in one pass
        if off_b > off_a + a.numel():
            flat[off_a + a.numel() : off_b].zero_()
        if b.dtype == dtype:
            torch.mul(b.t(), scaling, out=B)  # transposed and scaled in one pass, rounded once
        else:  # converted first, then scaled in `dtype` (a bf16 file served in fp32 keeps the fp32 product)
            B.copy_(b.t())
            B.mul_(scaling)
        filled = off_b + b.numel()
        out[name] = LoRAModuleWeights(A=A, B=B, scaling=scaling)
    flat[filled:].zero_()
    # one reduction over every value: min and max are NaN when any value is (torch propagates NaN), and
    # infinite when any value is; only then is the module looked for, to name it
    if flat.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(flat)):
        bad = next(name for name, w in out.items() if not (torch.isfinite(w.A).all() and torch.isfinite(w.B).all()))
        raise AdapterFormatError(f"{root}: {bad} holds NaN or infinite values")
    return out
