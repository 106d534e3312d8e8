#!/usr/bin/env bash
# Starts jarvis-deploy on this machine: installs it into .venv, makes sure the Docker Engine runs,
# applies the migrations, then runs a worker in the background and the API in the foreground.
# Ctrl-C stops both.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

"$ROOT/scripts/install.sh"
"$ROOT/scripts/services.sh"

JD="$ROOT/.venv/bin/jarvis-deploy"
"$JD" migrate

"$JD" worker &
worker_pid=$!
trap 'kill "$worker_pid" 2>/dev/null; wait "$worker_pid" 2>/dev/null' EXIT INT TERM

echo "API on http://${JARVIS_API_HOST:-127.0.0.1}:${JARVIS_API_PORT:-8000} (docs at /docs)"
"$JD" api --host "${JARVIS_API_HOST:-127.0.0.1}" --port "${JARVIS_API_PORT:-8000}"
