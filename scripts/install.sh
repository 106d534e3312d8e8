#!/usr/bin/env bash
# Creates .venv and installs jarvis-deploy into it (editable, with the test extras) when needed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e "$ROOT[test]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
