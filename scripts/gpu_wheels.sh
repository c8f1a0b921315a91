#!/usr/bin/env bash
# Wheels for what the lent GPU machine lacks and the training check (scripts/gpu_check.sh d) imports: eth-account
# and its dependencies, at the versions constraints.txt pins, for the device's CPython 3.12 on x86_64 Linux.
# Run here (it needs PyPI); then name `.whl` in the device call's carry. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
pkgs=(eth-account eth-abi eth-hash eth-keyfile eth-keys eth-rlp eth-typing eth-utils hexbytes parsimonious rlp
      bitarray ckzg cytoolz pycryptodome pydantic pydantic-core annotated-types typing-inspection py-ecc
      typing-extensions)
specs=()
for p in "${pkgs[@]}"; do
  pin=$(grep -iE "^${p//-/[-_.]}==" constraints.txt || true)
  [ -n "$pin" ] || { echo "constraints.txt pins no version of $p; add it (pip freeze) first" >&2; exit 2; }
  specs+=("$pin")
done
rm -rf .whl && mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls .whl | wc -l | xargs echo "wheels in .whl:"
du -sh .whl
