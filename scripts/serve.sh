#!/usr/bin/env bash
# Installs omnivox on a fresh Debian machine and starts the server with configs/default.yaml (extra args go to
# `omnivox serve`, e.g. --engine scripted --port 8000). With a CUDA GPU the default engine is Qwen2.5-Omni-7B.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends espeak-ng
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0        # no GPU: the CPU wheel, not a multi-GB CUDA build
fi
.venv/bin/python -m pip install -q -e .
exec .venv/bin/omnivox serve "$@"
