"""`careservice check` and `run` refuse what would fail later: unknown keys, broken templates, unsafe keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from careservice.config import ConfigError
from careservice.config import load_config
from careservice.texts import Texts
from tests.reliability.helpers import set_keys
from tests.support import write_config


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "careservice", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def with_override(tmp_path: Path, name: str, text: str) -> Path:
    """A config whose service.templates_dir holds one file, `name` (e.g. "mail/en/ack.txt"), with `text`."""
    override = tmp_path / "overrides"
    (override / name).parent.mkdir(parents=True, exist_ok=True)
    (override / name).write_text(text)
    return with_lines(write_config(tmp_path, 1), "service", f'templates_dir = "{override}"')


def with_lines(path: Path, table: str, *lines: str) -> Path:
    """The config at `path` with `lines` added at the top of `[table]` (a new table when it has none)."""
    text = path.read_text()
    head = f"[{table}]\n"
    text = text.replace(head, head + "\n".join(lines) + "\n", 1) if head in text else (
        "\n".join([head.strip(), *lines]) + "\n" + text)
    path.write_text(text)
    return path


@pytest.mark.parametrize(("table", "line", "key"), [
    ("retention", "unanswered_day = 7", "retention.unanswered_day"),
    ("smtp", "require_tsl = true", "smtp.require_tsl"),
    ("web", 'listn = "127.0.0.1:1"', "web.listn"),
    ("retension", "unanswered_days = 7", "retension"),
])
def test_an_unknown_key_or_table_is_an_error_naming_it(tmp_path: Path, table: str, line: str, key: str) -> None:
    config = with_lines(write_config(tmp_path, 1), table, line)
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert raised.value.key == key
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert key in result.stderr and "unknown" in result.stderr


@pytest.mark.parametrize(("values", "key"), [
    ({"reply_min_free_bytes": 2}, "smtp.reply_min_free_bytes"),  # above min_free_bytes (1 in tests)
    ({"max_bytes_per_sender_per_hour": 1000}, "smtp.max_bytes_per_sender_per_hour"),  # below max_message_bytes
    ({"max_connections_per_client": 0}, "smtp.max_connections_per_client"),
    ({"idle_before_mail": -1}, "smtp.idle_before_mail"),
])
def test_intake_limits_that_cannot_work_are_errors_naming_the_key(tmp_path: Path, values: dict[str, int],
                                                                  key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(set_keys(write_config(tmp_path, 1), "smtp", **values))
    assert raised.value.key == key


def test_the_hard_limit_defaults_past_the_unanswered_days_and_must_stay_past_them(tmp_path: Path) -> None:
    config = with_lines(write_config(tmp_path, 1), "retention", "unanswered_days = 10")
    assert load_config(config).hard_limit_days == 12
    with pytest.raises(ConfigError, match="must be more than retention.unanswered_days") as raised:
        load_config(with_lines(config, "retention", "hard_limit_days = 10"))
    assert raised.value.key == "retention.hard_limit_days"


def test_a_postgresql_claim_must_outlast_a_relay_send(tmp_path: Path) -> None:
    """A lease that runs out mid-send lets another node send the same mail again: check refuses it."""
    config = with_lines(write_config(tmp_path, 1), "store", 'url = "postgresql://cases@db.test/cases"',
                        'keys_url = "postgresql://keys@db.test/keys"')  # write_config: relay.timeout = 10
    assert load_config(config).store.lease_seconds == 20  # twice relay.timeout unless set
    for lease in (10, 3):
        with pytest.raises(ConfigError, match=r"must be more than relay\.timeout \(10\)") as raised:
            load_config(set_keys(config, "store", lease_seconds=lease))
        assert raised.value.key == "store.lease_seconds"
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "store.lease_seconds" in result.stderr
    assert load_config(set_keys(config, "store", lease_seconds=11)).store.lease_seconds == 11
    sqlite = with_lines(write_config(tmp_path / "sqlite", 1), "store", "lease_seconds = 3")  # one node claims nothing
    assert load_config(sqlite).store.lease_seconds == 3


def test_a_typo_gets_a_suggestion(tmp_path: Path) -> None:
    config = with_lines(write_config(tmp_path, 1), "smtp", "require_tsl = true")
    with pytest.raises(ConfigError, match='did you mean "require_tls"'):
        load_config(config)


def test_an_unknown_key_in_a_site_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    config.write_text(config.read_text().replace('id = "ixs"\n', 'id = "ixs"\nstaf = ["x@y.example"]\n'))
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert raised.value.key == "sites[1].staf"


@pytest.mark.parametrize("value", ["dkim ", "authres:", "authres:mx example", "DKIM", "spf"])
def test_check_names_an_unknown_staff_auth(tmp_path: Path, value: str) -> None:
    config = write_config(tmp_path, 1)
    config.write_text(config.read_text().replace('id = "ixs"\n', f'id = "ixs"\nstaff_auth = "{value}"\n'))
    result = cli("check", "--config", str(config))
    assert result.returncode != 0 and 'sites[1].staff_auth: use "none", "dkim"' in result.stderr + result.stdout


def test_staff_auth_defaults_to_none_and_reads_its_modes(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    text = config.read_text().replace('id = "ixs"\n', 'id = "ixs"\nstaff_auth = "authres:mx.ixs.test"\n')
    config.write_text(text.replace('id = "ticketnest"\n', 'id = "ticketnest"\nstaff_auth = "dkim"\n'))
    loaded = load_config(config)
    assert [s.staff_auth for s in loaded.sites] == ["dkim", "authres:mx.ixs.test"]
    assert load_config(write_config(tmp_path / "plain", 1)).sites[0].staff_auth == "none"


def test_check_renders_every_template_and_names_a_broken_site_override(tmp_path: Path) -> None:
    config = with_override(tmp_path, "mail/de/ixs/ack.txt", "Subject: Thanks\n\nHello {{ contact.name }\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 2, result.stdout
    assert "site ixs" in result.stderr and "mail/de/ixs/ack.txt" in result.stderr  # every language is checked
    assert "ticketnest" not in result.stderr  # the other site uses the packaged default, which is fine
    run = cli("run", "--config", str(config))
    assert run.returncode == 2 and "mail/de/ixs/ack.txt" in run.stderr


def test_check_names_a_template_that_uses_an_unknown_value(tmp_path: Path) -> None:
    config = with_override(tmp_path, "web/en/ticketnest/thanks.html", "{{ site.nmae.upper() }}")
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert "site ticketnest" in result.stderr and "web/en/ticketnest/thanks.html" in result.stderr


def test_a_mail_template_without_its_subject_line_is_refused(tmp_path: Path) -> None:
    config = with_override(tmp_path, "mail/en/notice.txt", "{{ headline }}\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "mail/en/notice.txt" in result.stderr and "Subject" in result.stderr


def test_an_override_falls_back_to_the_packaged_default_per_file(tmp_path: Path) -> None:
    config = load_config(with_override(tmp_path, "web/en/ixs/thanks.html", "ixs says thank you"))
    texts = Texts(config.templates_dir, config.sites)
    ixs, ticketnest = config.site("ixs"), config.site("ticketnest")
    assert ixs is not None and ticketnest is not None
    assert texts.page("ixs", "thanks", site=ixs, nonce="n") == "ixs says thank you"
    assert "ixs says" not in texts.page("ticketnest", "thanks", site=ticketnest, nonce="n", contact_url="/c")
    assert texts.mail("ixs", "notice", site=ixs, case_id="c", headline="h", explanation="e")[0]
    assert all(not texts.check(site) for site in config.sites)


def test_check_refuses_a_missing_templates_dir(tmp_path: Path) -> None:
    config = with_lines(write_config(tmp_path, 1), "service", f'templates_dir = "{tmp_path / "nowhere"}"')
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "service.templates_dir" in result.stderr


def test_check_refuses_a_master_key_others_can_read(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    assert cli("keygen", "--config", str(config)).returncode == 0
    key = tmp_path / "master.key"
    assert cli("check", "--config", str(config)).returncode == 0
    key.chmod(0o644)
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert "security.master_key_file" in result.stderr and "0644" in result.stderr
    key.write_text("not a key\n")
    key.chmod(0o600)
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "32 bytes" in result.stderr


def test_check_refuses_listeners_on_one_address(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    text = config.read_text()
    smtp = text.split("[smtp]\nlisten = ")[1].split("\n")[0]
    web = text.split("[web]\nlisten = ")[1].split("\n")[0]
    config.write_text(text.replace(f"[web]\nlisten = {web}", f"[web]\nlisten = {smtp}"))
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "web.listen: same address as smtp.listen" in result.stderr


def test_check_loads_the_tls_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("care.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "good.pem"))
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    config = with_lines(write_config(tmp_path, 1), "smtp", 'tls_cert = "good.pem"', 'tls_key = "good.pem"')
    assert cli("check", "--config", str(config)).returncode == 0  # relative to the config's folder
    config.write_text(config.read_text().replace('tls_cert = "good.pem"', 'tls_cert = "bad.pem"'))
    result = cli("check", "--config", str(config), cwd=Path("/"))
    assert result.returncode == 2 and "smtp.tls_cert" in result.stderr


def test_check_names_an_unreadable_secret(tmp_path: Path) -> None:
    config = with_lines(write_config(tmp_path, 1), "relay", 'password_file = "missing.password"')
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "relay.password_file" in result.stderr


def test_status_without_a_store_fails_clearly(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    result = cli("status", "--json", "--config", str(config))
    assert result.returncode == 1
    assert result.stdout == "" and "no store in" in result.stderr and "service.data_dir" in result.stderr


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("careservice 0.")


def test_config_error_exit_code_without_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    config.write_text(config.read_text().replace('url = "smtp://', 'url = "smpt://'))
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "relay.url" in result.stderr and "Traceback" not in result.stderr


def test_the_forms_words_are_data_beside_it_and_a_broken_file_is_named(tmp_path: Path) -> None:
    config = load_config(with_override(tmp_path, "web/en/ixs/form.toml", '[words]\nheading = "Write to {site}"\n'))
    texts = Texts(config.templates_dir, config.sites)
    ixs = config.site("ixs")
    assert ixs is not None
    assert texts.page_words("ixs", "form")["words"] == {"heading": "Write to {site}"}  # the site's own file wins
    assert texts.page_words("ticketnest", "form", "de")["labels"]["query"] == "Ihr Anliegen"
    broken = with_override(tmp_path / "broken", "web/de/form.toml", "[words\n")
    result = cli("check", "--config", str(broken))
    assert result.returncode == 2 and "web/de/form.toml: not valid TOML" in result.stderr
