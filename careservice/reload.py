"""SIGHUP: apply a changed config to a running process, or keep the old one when it fails `check`.

Sites (their addresses, staff lists, brand names, web hosts, DKIM keys), templates and the
acknowledgement limit apply at once, in both processes. Everything else is bound to sockets, files or running
loops and is reported as needing a restart; until then the old values stay in force.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from careservice.config import Config, ConfigError, load_config
from careservice.context import Context
from careservice.preflight import problems
from careservice.texts import Texts

log = logging.getLogger("careservice.reload")

RESTART_FIELDS = ("data_dir", "master_key_file", "stop_timeout", "worker_memory_mb", "workers", "log_level", "smtp",
                  "relay", "web", "unanswered_days", "hard_limit_days", "imap", "admin", "spam")


def reload_config(ctx: Context) -> Config | None:
    """Read the config file again and apply it to `ctx`; the applied config, or None if refused."""
    old = ctx.config
    try:
        new = load_config(old.path)
    except ConfigError as exc:
        log.error("reload_refused key=%s (the old config stays; `careservice check` says why)", exc.key)
        return None
    found = problems(new)
    if found:
        keys = ",".join(sorted({problem.split(":", 1)[0] for problem in found}))
        log.error("reload_refused keys=%s (the old config stays; `careservice check` says why)", keys)
        return None
    restart = [name for name in RESTART_FIELDS if getattr(old, name) != getattr(new, name)]
    applied = replace(new, **{name: getattr(old, name) for name in RESTART_FIELDS})
    ctx.config = applied
    ctx.addressing.use(applied.sites)
    ctx.texts = Texts(applied.templates_dir, applied.sites)
    log.info("reloaded sites=%d staff=%d%s", len(applied.sites), sum(len(s.staff) for s in applied.sites),
             f" needs_restart={','.join(restart)}" if restart else "")
    return applied
