#!/usr/bin/env bash
# Run on a development machine (it reaches PyPI): fetch, into .whl/, the
# wheels that the lent GPU machine lacks (it reaches nothing): kvikio for CUDA
# 13 and the peers the bench measures. That machine's Python is 3.12, x86-64,
# with cupy-cuda13x, numba-cuda, torch, typer and humanize already there.
#
#   bash bench/gpu/wheels.sh      # then carry .whl (see bench/gpu/session.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl  # ignored (.gitignore): the device tool carries it, git does not
platforms=(--platform manylinux2014_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    kvikio-cu13==26.10.0 libkvikio-cu13==26.10.0 rapids-logger==0.3.0 \
    fastsafetensors==0.5.0 runai-model-streamer==0.17.0 instanttensor==0.2.2
ls -l .whl
