#!/usr/bin/env bash
# Install careservice into a venv and run it in the foreground with ./config.toml (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ensurepip, venv" 2>/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e .
exec .venv/bin/careservice run --config "${CARESERVICE_CONFIG:-config.toml}"
