#!/usr/bin/env bash
# Starts jarvis-deploy on this machine: installs it into .venv, makes sure the Docker Engine runs,
# applies the migrations, then runs a worker, the API and, when JARVIS_UPSTREAM_RESOLVER is set, the
# upstream resolver. Ctrl-C stops them all, and so does the exit of any one of them.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

"$ROOT/scripts/install.sh"
"$ROOT/scripts/services.sh"

JD="$ROOT/.venv/bin/jarvis-deploy"
"$JD" migrate

pids=()
# Stop every process started here when the script ends, whatever ended it.
trap 'kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null' EXIT
trap 'exit 130' INT TERM

if [[ -n "${JARVIS_UPSTREAM_RESOLVER:-}" ]]; then
  "$JD" resolver &
  pids+=($!)
fi
"$JD" worker &
pids+=($!)

echo "API on http://${JARVIS_API_HOST:-127.0.0.1}:${JARVIS_API_PORT:-8000} (docs at /docs)"
"$JD" api --host "${JARVIS_API_HOST:-127.0.0.1}" --port "${JARVIS_API_PORT:-8000}" &
pids+=($!)

# An API without a worker would queue deployments that nothing runs, so the first process to exit
# stops the others.
set +e
wait -n "${pids[@]}"
status=$?
echo "a jarvis-deploy process exited with status $status; stopping the others" >&2
exit "$status"
