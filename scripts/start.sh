#!/usr/bin/env bash
# Starts jarvis-deploy on this machine: installs it into .venv, makes sure the Docker Engine runs,
# applies the migrations, then runs a worker and the API, and, when JARVIS_UPSTREAM_RESOLVER is set,
# the upstream resolver. Ctrl-C stops the worker and the API, and so does the exit of either one;
# the resolver keeps running.
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

# The resolver is on the request path, as Caddy is: it runs in a session of its own and stays up
# when this script ends, so routed projects keep serving requests while the API and worker are down.
if [[ -n "${JARVIS_UPSTREAM_RESOLVER:-}" ]]; then
  mkdir -p "$ROOT/.run"
  # One resolver per address and database: a run with other settings starts its own.
  config_digest=$(printf '%s %s' "$JARVIS_UPSTREAM_RESOLVER" "${JARVIS_DATABASE_URL:-}" | sha256sum | cut -c1-12)
  pid_file="$ROOT/.run/resolver-$config_digest.pid"
  log_file="$ROOT/.run/resolver-$config_digest.log"
  resolver_pid=$(cat "$pid_file" 2>/dev/null || true)
  if [[ -n "$resolver_pid" ]] && tr '\0' ' ' < "/proc/$resolver_pid/cmdline" 2>/dev/null | grep -q "jarvis-deploy resolver"; then
    echo "upstream resolver for these settings already running (pid $resolver_pid)"
  else
    setsid "$JD" resolver >>"$log_file" 2>&1 < /dev/null &
    resolver_pid=$!
    sleep 1
    if ! kill -0 "$resolver_pid" 2>/dev/null; then
      echo "the upstream resolver exited at once; last lines of $log_file:" >&2
      tail -n 5 "$log_file" >&2
      exit 1
    fi
    echo "$resolver_pid" > "$pid_file"
    echo "upstream resolver on udp $JARVIS_UPSTREAM_RESOLVER (pid $resolver_pid, log ${log_file#"$ROOT"/});" \
      "it keeps running after this script ends. Stop it with: kill $resolver_pid"
  fi
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
