"""`careservice run | check | keygen | dkim-keygen | status | stats | cases | export | migrate |
rotate-master-key | --version`; each takes --config PATH."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from careservice.config import DNS_NAME, METRICS_DIR_ENV, Config, ConfigError, load_config
from careservice.crypto import MasterKeyError, write_master_key
from careservice.dkim import KEY_BITS, txt_record, write_key
from careservice.logs import setup_logging
from careservice.preflight import problems
from careservice.stats import report, to_csv, to_json
from careservice.store import StoreError, read_status

EXIT_CONFIG = 2
EXIT_CASE_GONE = 3


def _run(config: Config, args: argparse.Namespace) -> int:
    found = problems(config)
    if found:
        for problem in found:
            print(f"careservice: config error: {problem}", file=sys.stderr)
        print("careservice: not started; `careservice check` lists the same problems", file=sys.stderr)
        return EXIT_CONFIG
    _share_metrics(config.data_dir)
    from careservice.daemon import run_forever  # imports aiosmtpd & co only when serving

    setup_logging(config.log_level)
    _serve(config, run_forever(config))
    return 0


def _share_metrics(data_dir: Path) -> None:
    """A new, empty folder under data_dir/metrics for the metrics of this run's processes (the worker
    inherits the variable); before anything imports prometheus_client, which picks its mode at its first
    import. Earlier runs' folders are removed. A folder of its own per run, because after a kill -9 of
    the daemon its old worker can live on for a moment and make files in its folder: emptying one shared
    folder then failed, and the restart stopped on "File exists"."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    root = data_dir / "metrics"
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.mkdir(mode=0o700, exist_ok=True)
    for old in root.iterdir():  # a folder still written to is left, and removed at the next start
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # files of the layout before runs had folders of their own
            old.unlink(missing_ok=True)
    os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="run-", dir=root)  # 0700


def _worker(config: Config, args: argparse.Namespace) -> int:
    from careservice.worker import run_worker

    if not 0 <= args.index < args.of:
        print(f"careservice: worker --index {args.index} is not below --of {args.of}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    _serve(config, run_worker(config, (args.index, args.of)))
    return 0


def _serve(config: Config, main: Coroutine[Any, Any, None]) -> None:
    """Run a serving process's main coroutine on service.event_loop."""
    if config.event_loop == "uvloop":
        import uvloop  # config.py checked that it is installed

        uvloop.run(main)
    else:
        asyncio.run(main)


def _check(config: Config, args: argparse.Namespace) -> int:
    found = problems(config)
    for problem in found:
        print(f"careservice: config error: {problem}", file=sys.stderr)
    if found:
        return EXIT_CONFIG
    print(f"config {config.path}: ok")
    print(f"  data_dir   {config.data_dir}")
    print(f"  templates  {config.templates_dir or '(packaged)'}, every template renders for every site")
    print(f"  smtp       {config.smtp.listen.host}:{config.smtp.listen.port}"
          f"{' (STARTTLS)' if config.smtp.tls_cert else ''}")
    print(f"  web        {config.web.listen.host}:{config.web.listen.port} verification={config.web.verification}")
    relay_auth = config.relay.oauth2
    print(f"  relay      {config.relay.url}{f' (oauth2 {relay_auth.grant})' if relay_auth else ''}")
    print(f"  spam       {f'rspamd {config.spam.rspamd_url}' if config.spam.rspamd_url else 'off'}")
    admin = config.admin.listen
    print(f"  admin      {f'{admin.host}:{admin.port}' if admin else 'off'}"
          f"{' (bearer token)' if admin and config.admin.token_file else ''}")
    print(f"  retention  unanswered cases purged after {config.unanswered_days} days, every case after "
          f"{config.hard_limit_days}")
    print(f"  digest     {f'daily at {config.digest_at:%H:%M} local time' if config.digest_at else 'off'}")
    for site in config.sites:
        print(f"  site {site.id}: {site.name} <{site.care_address}> staff={len(site.staff)}"
              f"{f' routes={len(site.routes)}' if site.routes else ''}"
              f"{f' dkim={site.dkim_selector}' if site.dkim_selector else ''}")
    for box in config.imap:
        print(f"  imap {box.name} -> site {box.site}{f' (oauth2 {box.oauth2.grant})' if box.oauth2 else ''}")
    return 0


def _keygen(config: Config, args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else config.master_key_file
    try:
        write_master_key(path)
    except FileExistsError:
        print(f"careservice: {path} exists; not overwriting a master key (move it away first)", file=sys.stderr)
        return 1
    print(f"wrote new master key to {path} (mode 0600)")
    return 0


def _dkim_keygen(config: Config, args: argparse.Namespace) -> int:
    index = next((i for i, site in enumerate(config.sites) if site.id == args.site), None)
    if index is None:
        print(f"careservice: no site with id {args.site!r} in {config.path}", file=sys.stderr)
        return 1
    site = config.sites[index]
    selector = args.selector or site.dkim_selector
    path = Path(args.output) if args.output else Path(site.dkim_key_file) if site.dkim_key_file else None
    if not selector or path is None or not DNS_NAME.fullmatch(selector):
        dated = f"care{datetime.now(UTC):%Y}a"
        print(f"careservice: sites[{index}] ({site.id}) needs dkim_selector and dkim_key_file, or pass --selector "
              f"and --output; selectors are dated DNS labels, e.g. --selector {dated} --output "
              f"dkim/{site.id}-{dated}.pem", file=sys.stderr)
        return 1
    try:
        private = write_key(path)
    except FileExistsError:
        print(f"careservice: {path} exists; not overwriting a DKIM key (a new key gets a new selector and file)",
              file=sys.stderr)
        return 1
    print(f"wrote a new {KEY_BITS}-bit DKIM key for site {site.id} to {path} (mode 0600)")
    print("publish this DNS record before the config names the key, and keep it while mail signed with it may "
          "still be verified:")
    print(txt_record(selector, site.domain, private))
    return 0


def _status(config: Config, args: argparse.Namespace) -> int:
    try:
        status = read_status(config.data_dir, config.store)
    except StoreError as exc:
        print(f"careservice: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status))
    else:
        for key, value in status.items():
            print(f"{key}: {value}")
    return 0


def _migrate(config: Config, args: argparse.Namespace) -> int:
    from careservice.storeadmin import migrate

    for line in migrate(config.store, config.data_dir):
        print(line)
    return 0


def _rotate_master_key(config: Config, args: argparse.Namespace) -> int:
    from careservice.storeadmin import rotate_master_key

    setup_logging(config.log_level)
    kept, rewrapped = rotate_master_key(config)
    print(f"wrote a new master key to {config.master_key_file} (mode 0600); {rewrapped} wrapped keys now under it")
    print(f"the old key is in {kept}: delete it once every node runs with the new one (they follow the file) and "
          "before the oldest backup of the keys it wrapped must stop being readable")
    return 0


def _stats(config: Config, args: argparse.Namespace) -> int:
    try:
        stats = report(config.data_dir, [site.id for site in config.sites], args.days, backend=config.store)
    except StoreError as exc:
        print(f"careservice: {exc}", file=sys.stderr)
        return 1
    print(to_json(stats) if args.json else to_csv(stats), end="\n" if args.json else "")
    return 0


def _cases(config: Config, args: argparse.Namespace) -> int:
    from careservice.disclosure import list_cases

    print(json.dumps(asyncio.run(list_cases(config, time.time()))))
    return 0


def _export(config: Config, args: argparse.Namespace) -> int:
    from careservice.disclosure import CaseGone, export_case

    setup_logging(config.log_level)
    try:
        written = asyncio.run(export_case(config, args.case, Path(args.out), time.time()))
    except CaseGone:
        print(f"careservice: case {args.case} is not open: answered, closed or expired (its data is deleted), "
              "or it never existed; nothing was written", file=sys.stderr)
        return EXIT_CASE_GONE
    except FileExistsError:
        print(f"careservice: {args.out} exists; not overwriting it", file=sys.stderr)
        return 1
    print(f"wrote case {args.case} ({written} messages) to {args.out} (mode 0600)")
    return 0


def _days(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 3660:
        raise argparse.ArgumentTypeError(f"expected a number of days from 1 to 3660, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="careservice", description=__doc__)
    parser.add_argument("--version", action="version", version=f"careservice {version('careservice')}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", _run, "run the daemon in the foreground"),
                             ("check", _check, "validate the config and print a summary"),
                             ("keygen", _keygen, "write a new master key file"),
                             ("dkim-keygen", _dkim_keygen, "write a new DKIM key for a site, print its DNS record"),
                             ("status", _status, "print queue and case counts from the store"),
                             ("stats", _stats, "print the per-site daily statistics"),
                             ("cases", _cases, "list the open cases as JSON (needs the master key)"),
                             ("export", _export, "write one open case as an mbox file (lawful disclosure)"),
                             ("migrate", _migrate, "create or update the store's schema (both databases)"),
                             ("rotate-master-key", _rotate_master_key,
                              "re-wrap every case key under a new master key, keeping the old key beside it"),
                             ("worker", _worker, "(internal) the case worker that `run` starts")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", default="config.toml", help="config file (default ./config.toml)")
        sub.set_defaults(func=func)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON")
        if name == "stats":
            output = sub.add_mutually_exclusive_group(required=True)
            output.add_argument("--json", action="store_true", help="print JSON")
            output.add_argument("--csv", action="store_true", help="print CSV, one row per site and day")
            sub.add_argument("--days", type=_days, default=30, help="days up to today (UTC), default 30")
        if name == "dkim-keygen":
            sub.add_argument("--site", required=True, help="the [[sites]] id")
            sub.add_argument("--selector", help="a new selector, for a rotation (default the site's dkim_selector)")
            sub.add_argument("--output", help="write here instead of the site's dkim_key_file")
        if name == "cases":
            sub.add_argument("--json", action="store_true", required=True, help="print JSON (the only format)")
        if name == "export":
            sub.add_argument("--case", required=True, help="the case id")
            sub.add_argument("--out", required=True, help="the mbox file to create (never overwritten)")
        if name == "keygen":
            sub.add_argument("--output", help="write here instead of security.master_key_file")
        if name == "worker":  # set by `run`, one pair for each of its service.workers children
            sub.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
            sub.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.umask(0o077)  # whatever we create (stores, WAL, keys, locks, dev mail) is ours alone
    try:
        config = load_config(Path(args.config))
        return args.func(config, args)
    except ConfigError as exc:
        print(f"careservice: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MasterKeyError as exc:
        print(f"careservice: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (StoreError, OSError) as exc:
        print(f"careservice: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
