#!/usr/bin/env bash
# Install careservice into a venv and run it in the foreground with ./config.toml (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ensurepip, venv" 2>/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
# The install is editable, so code changes need none: reinstall only when pyproject.toml changed since the
# last install (the stamp holds its hash; scripts/test.sh's '.[test]' install will do too) or the venv cannot
# import the package (missing, moved, broken).
stamp=.venv/.careservice-install
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
installed=$(cut -d' ' -f1 "$stamp" 2>/dev/null || true)
if [ "$installed" != "$hash" ] || ! .venv/bin/python -I -c "import careservice" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e .
    echo "$hash ." >"$stamp"
fi
exec .venv/bin/careservice run --config "${CARESERVICE_CONFIG:-config.toml}"
