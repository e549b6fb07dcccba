#!/usr/bin/env bash
# Install everything the tests need (Debian packages when run as root, a venv with the project),
# then run the linter and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
command -v rspamd >/dev/null 2>&1 || need+=(rspamd)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)  # its smtp-sink is a relay in a test
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)  # tests/postgres.py runs its own server
python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        # postfix unconfigured: only its smtp-sink is used, no system instance is set up
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        # the packages may start a system Dovecot, rspamd, Postfix and PostgreSQL cluster; tests run their own instances
        for service in dovecot rspamd postfix postgresql; do
            (systemctl disable --now "$service" || service "$service" stop) >/dev/null 2>&1 || true
        done
        if command -v pg_lsclusters >/dev/null 2>&1; then  # Debian's own cluster: stopped, never started at boot
            pg_lsclusters --no-header | while read -r version cluster _; do
                pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
                echo manual >"/etc/postgresql/$version/$cluster/start.conf" 2>/dev/null || true
            done
        fi
    else
        echo "note: not root, cannot install ${need[*]}; tests needing them are skipped" >&2
    fi
fi

# Reinstall only when pyproject.toml changed since the last '.[test]' install or the venv cannot import what
# the tests need (a fresh clone, as in CI, always installs); the install is editable, code needs none.
stamp=.venv/.careservice-install
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$hash .[test]" ] \
        || ! .venv/bin/python -I -c "import careservice, pytest" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    echo "$hash .[test]" >"$stamp"
fi
.venv/bin/ruff check careservice handlers tests bench
.venv/bin/python -m pytest -q "$@"
