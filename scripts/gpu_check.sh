#!/usr/bin/env bash
# The engine's GPU checks as one prepared script for a lent device machine (torch, Triton, transformers and peft
# are there; web3 and bitsandbytes are not, and nothing this runs needs them). Three stages, one device call
# each or a and b in one, so that a lease of 15 minutes holds them with room for a machine start:
#
#   a   the CUDA tests (~180): captured decode graphs vs plain steps (base and adapters), the compiled Triton
#       attention, LoRA and fused layer-op kernels against their torch twins; then bench_engine on a 1B-class
#       random model (bf16, batch 32): graphs vs eager steps vs transformers, decode step time vs the
#       bandwidth bound (issue 3's targets), and each variant's host time per step by phase (`host_phases`:
#       a `wait` near 0 means the host, not the GPU, bounds the steps run ahead)                     (est. 6 min)
#   b   bench_lora on a reduced trace: Llama-3-8B shape, bf16, rank 16, N in {1, 8, 32}, peft up to 32
#       (issue 4's targets)                                                                          (est. 6 min)
#   c   bench_engine on the Llama-3-8B shape (the bandwidth check where host time per step is small
#       against the weights' read time), if time is left                                            (est. 3 min)
#   d   training on the GPU (issue 21): the CUDA tests of tests/node/lineage/test_training_options.py (bf16
#       runs repeat bit for bit, float32 follows the CPU's losses, accumulation follows the larger batch),
#       then bench_training on a 100M random Llama: float32 vs bf16 vs bf16 with accumulation, and the
#       CPU in float32 per token. Training verifies signed datanets, so it needs eth-account, which the
#       device lacks: run `bash scripts/gpu_wheels.sh` here first and name `.whl` in the call's carry   (est. 4 min)
#
#   bash scripts/gpu_check.sh a        # results and logs go to $OUT if set (the device tool's folder),
#   bash scripts/gpu_check.sh b        # else to benchmarks/results/
#   bash scripts/gpu_check.sh c
#   bash scripts/gpu_check.sh d        # carry: [".whl"]
#
# The stage times are estimates, not yet measured on a GPU (a cold Triton cache compiles every kernel variant
# the tests use, a minute or two): each step has its own timeout, so a slow step leaves the others' results,
# and each benchmark rewrites its JSON after every section (`complete` is false in one cut short).
set -uo pipefail
stage=${1:-a}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
# The device has no install of this project: `loraledger.node` etc. resolve through a folder of links, the
# layout pyproject.toml's package-dir installs (`loraledger` is an implicit namespace package).
src=$(mktemp -d)
mkdir -p "$src/loraledger"
for d in node inference kernels proto; do ln -s "$PWD/$d" "$src/loraledger/$d"; done
if [ -d .whl ]; then  # wheels carried for what the device lacks (scripts/gpu_wheels.sh)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$src/site" .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$src/site"
fi
export PYTHONPATH="$src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$py" - <<'EOF' 2>&1 | tee "$out/gpu_env.log"
import platform, torch, triton, transformers, peft
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

case "$stage" in
  a)
    timeout 330 "$py" -m pytest -q -p no:cacheprovider -o addopts="-ra --import-mode=importlib" \
      tests/inference/test_graph_runner.py tests/inference/lora/test_graph_lora.py tests/inference/test_async_decode.py \
      tests/inference/lora/test_graph_capture_safety.py \
      tests/inference/test_attention.py tests/kernels/test_lora_kernels.py tests/kernels/test_layer_ops.py \
      2>&1 | tee "$out/gpu_tests.log"
    timeout 240 "$py" scripts/bench_engine.py --device cuda --out "$out/engine_cuda.json" 2>&1 \
      | tee "$out/bench_engine_cuda.log"
    ;;
  b)
    timeout 480 "$py" scripts/bench_lora.py --device cuda --num-adapters 1,8,32 --num-requests 128 \
      --input-len 8 128 --output-len 8 128 --peft-max-adapters 32 --peft-max-requests 64 --distinct-files 32 \
      --out "$out/lora_cuda.json" 2>&1 | tee "$out/bench_lora_cuda.log"
    ;;
  c)
    timeout 300 "$py" scripts/bench_engine.py --device cuda --size llama3-8b --out "$out/engine_cuda_8b.json" 2>&1 \
      | tee "$out/bench_engine_cuda_8b.log"
    ;;
  d)
    timeout 240 "$py" -m pytest -q -p no:cacheprovider -o addopts="-ra --import-mode=importlib" \
      tests/node/lineage/test_training_options.py 2>&1 | tee "$out/gpu_training_tests.log"
    timeout 300 "$py" scripts/bench_training.py --device cuda --size 100m --records 96 --seq-len 256 --batch 8 \
      --cpu-baseline --cpu-records 8 --out "$out/training_cuda.json" 2>&1 | tee "$out/bench_training_cuda.log"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh a|b|c|d" >&2
    exit 2
    ;;
esac
