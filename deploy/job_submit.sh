#!/usr/bin/env bash
# Start a local Ray head (if none is running) and submit the serving entrypoint as a Ray job.
#   deploy/job_submit.sh [extra args for disagg.cluster.launch, e.g. --smoke-test or --prefill 2 --decode 2]
set -euo pipefail
cd "$(dirname "$0")/.."
DASH_PORT=${DASH_PORT:-8265}
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=token
if ! ray status >/dev/null 2>&1; then
    ray start --head --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --disable-usage-stats
fi
ray job submit --address "http://127.0.0.1:$DASH_PORT" -- python -m disagg.cluster.launch "$@"
