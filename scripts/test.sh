#!/usr/bin/env bash
# Runs the test suite against real components: installs the package, starts the Docker Engine, the
# loopback registry and Caddy where missing, builds the test images, then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

"$ROOT/scripts/install.sh"
"$ROOT/scripts/services.sh" --test

exec "$ROOT/.venv/bin/python" -m pytest "$@"
