#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (apt, venv, pip, npm), then runs it all.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0          # the CPU wheel; GPU users install their CUDA torch
.venv/bin/python -m pip install -q -e '.[test]'

if [ -f examples/node/package-lock.json ]; then
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
.venv/bin/python -m pytest -q -rs --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests"
fi
exit "$status"
