#!/usr/bin/env bash
# Engine benchmarks on a GPU machine that has CUDA torch but reaches no package registry.
#
#   scripts/gpu_bench.sh wheels         # here, with registry access: transformers 5.23 (+ regex) into .whl/
#   scripts/gpu_bench.sh run ARGS...    # there, in the repo root with .whl/ carried along:
#                                       #   benchmarks/engine_latency.py ARGS... with the carried wheels
#
# The streaming loops use transformers internals, so the benchmark needs the pinned 5.23.0, not the machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    rm -rf .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "transformers==5.23.0" "regex==2026.11.15"
    ls -l .whl
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 benchmarks/engine_latency.py "$@"
    ;;
*)
    echo "usage: $0 wheels | run [engine_latency.py arguments]" >&2
    exit 2
    ;;
esac
