"""Settings (mirror.settings) from an injected environment, without a database: defaults, and a
ConfigError naming the variable (never echoing a secret) for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror import cli, settings
from mirror.errors import ConfigError
from mirror.settings import Settings, parse_webhook_secrets
from tests.conftest import API_TOKEN, OTHER_SECRET, SECRET

BASE = {"DATABASE_URL": "postgresql://u:pw@db/mirror", "MIRROR_WEBHOOK_SECRET": SECRET,
        "MIRROR_API_TOKEN": API_TOKEN}


def refusal(env: dict[str, str], **kwargs: bool) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env, **kwargs)
    return str(caught.value)


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert (s.host, s.port, s.workers, s.batch_size, s.projector) == (
        "127.0.0.1", 8080, 1, 2000, "process")
    assert s.webhook_secrets == (SECRET,) and s.api_token == API_TOKEN
    assert s.uvloop and s.metrics_dir is None and s.read_database_url is None
    assert s.trackstar_base_url == "https://production.trackstarhq.com"


def test_every_variable_is_read() -> None:
    s = Settings.from_env({**BASE, "MIRROR_HOST": "0.0.0.0", "MIRROR_PORT": "9000",
                           "MIRROR_WORKERS": "4", "MIRROR_BATCH_SIZE": "50",
                           "MIRROR_UVLOOP": "0", "MIRROR_PROJECTOR": "Inline",
                           "MIRROR_DB_TIMEOUT": "7", "MIRROR_REQUEST_TIMEOUT": "3",
                           "MIRROR_MAX_BODY_BYTES": "2048", "MIRROR_INGRESS_PROCESSES": "2",
                           "MIRROR_READ_DATABASE_URL": " postgresql://replica/db ",
                           "PROMETHEUS_MULTIPROC_DIR": "/tmp/m",
                           "MIRROR_TRACKSTAR_BASE_URL": "http://fake:8000/"})
    assert (s.host, s.port, s.workers, s.batch_size, s.uvloop, s.projector) == (
        "0.0.0.0", 9000, 4, 50, False, "inline")
    assert (s.db_timeout, s.request_timeout, s.max_body_bytes, s.ingress_processes) == (
        7.0, 3, 2048, 2)
    assert s.read_database_url == "postgresql://replica/db" and s.metrics_dir == "/tmp/m"
    assert s.trackstar_base_url == "http://fake:8000"


@pytest.mark.parametrize(("variable", "value", "fragment"), [
    ("MIRROR_PORT", "http", "must be an integer"),
    ("MIRROR_PORT", "-1", "between 0 and 65535"),
    ("MIRROR_BATCH_SIZE", "1e3", "must be an integer"),
    ("MIRROR_BATCH_SIZE", "0", "between 1 and 100000"),
    ("MIRROR_WORKERS", "17", "between 1 and 16"),
    ("MIRROR_UVLOOP", "2", "must be 1 or 0"),
    ("MIRROR_PROJECTOR", "thread", "must be one of process, inline"),
    ("MIRROR_DB_TIMEOUT", "0.5", "must be an integer"),
    ("MIRROR_TRACKSTAR_BASE_URL", "ftp://x", "must be an http(s) URL"),
    ("MIRROR_TRACKSTAR_BASE_URL", "http://u:p@x", "without credentials"),
    ("MIRROR_API_TOKEN", "short", "at least 16 characters"),
])
def test_a_bad_value_names_its_variable(variable: str, value: str, fragment: str) -> None:
    message = refusal({**BASE, variable: value})
    assert message.startswith(variable) and fragment in message


def test_secrets_are_required_checked_and_never_echoed_nor_shown() -> None:
    assert "is not set" in refusal({k: v for k, v in BASE.items()
                                    if k != "MIRROR_WEBHOOK_SECRET"})
    assert "DATABASE_URL is not set" in refusal({k: v for k, v in BASE.items()
                                                 if k != "DATABASE_URL"})
    for bad in ("hunter2", "whsec_%%%%", "whsec_c2hvcnQ="):
        message = refusal({**BASE, "MIRROR_WEBHOOK_SECRET": f"{SECRET} {bad}"})
        assert message.startswith("MIRROR_WEBHOOK_SECRET: secret #2") and bad not in message
    assert parse_webhook_secrets(f" {SECRET},{OTHER_SECRET}\n") == (SECRET, OTHER_SECRET)
    s = Settings.from_env({**BASE, "MIRROR_TRACKSTAR_API_KEY": "key-1234"})
    assert SECRET not in repr(s) and API_TOKEN not in repr(s) and "key-1234" not in repr(s)
    assert "pw" not in settings.masked_url(s.database_url)


def test_commands_that_do_not_serve_need_no_secrets() -> None:
    s = Settings.from_env({"DATABASE_URL": "postgresql://db/m"}, require_secrets=False)
    assert s.webhook_secrets == () and s.api_token == ""


def test_the_settings_read_before_the_database_is_known() -> None:
    assert settings.log_level({}) == "INFO"
    assert settings.log_level({"MIRROR_LOG_LEVEL": " debug "}) == "DEBUG"
    with pytest.raises(ConfigError, match=r"^MIRROR_LOG_LEVEL must be one of"):
        settings.log_level({"MIRROR_LOG_LEVEL": "loud"})
    assert settings.data_dir({}) == Path(".data")
    assert settings.data_dir({"MIRROR_DATA_DIR": "/var/lib/mirror"}) == Path("/var/lib/mirror")
    assert settings.read_database_url({"MIRROR_READ_DATABASE_URL": "  "}) is None
    assert settings.listen_address({"MIRROR_HOST": "::", "MIRROR_PORT": "81"}) == ("::", 81)
    assert settings.webhook_url("::", 81) == "http://127.0.0.1:81/webhooks"
    assert settings.webhook_url("10.0.0.5", 8080) == "http://10.0.0.5:8080/webhooks"


def test_the_help_text_names_every_command() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None and len(commands) >= 12
    doc = cli.__doc__ or ""
    for name in commands:
        assert f"\n  {name} " in doc, name


def test_serve_leaves_one_core_to_its_projection_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from mirror.processes import ingress_processes

    base = Settings(database_url="postgresql://x/db", webhook_secrets=(), api_token="t" * 32,
                    ingress_processes=0, projector="process")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert ingress_processes(base, project=True) == 1
    assert ingress_processes(base, project=False) == 2  # a `--no-projector` host
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert ingress_processes(base, project=True) == 4
    chosen = Settings(database_url="postgresql://x/db", webhook_secrets=(), api_token="t" * 32,
                      ingress_processes=3)
    assert ingress_processes(chosen, project=True) == 3
