"""Database URLs naming several hosts, and the read replica's variable."""

from __future__ import annotations

import pytest

from mirror.errors import ConfigError
from mirror.settings import Settings, masked_url, primary_url, single_host_url, url_hosts

SECRETS = {"MIRROR_WEBHOOK_SECRET": "whsec_dHJhY2tzdGFyLW1pcnJvci10ZXN0LXNlY3JldC0wMQ==",
           "MIRROR_API_TOKEN": "t" * 32}


def test_hosts_are_listed_in_order_from_the_authority_or_the_host_parameter() -> None:
    assert url_hosts("postgresql://u:pw@h1:5432,h2:5433/db") == ["h1:5432", "h2:5433"]
    assert url_hosts("postgresql://u@/db?host=/run/a,/run/b") == ["/run/a", "/run/b"]
    assert url_hosts("postgresql://u@h/db") == ["h"]


def test_several_hosts_without_target_session_attrs_ask_for_a_writable_one() -> None:
    url = primary_url("postgresql://u:pw@h1:5432,h2:5433/db?sslmode=disable")
    assert url == ("postgresql://u:pw@h1:5432,h2:5433/db?sslmode=disable"
                   "&target_session_attrs=read-write")
    settings = Settings.from_env({**SECRETS, "DATABASE_URL": "postgresql://h1,h2/db"})
    assert settings.database_url.endswith("?target_session_attrs=read-write")
    # One host: left exactly as given.
    assert primary_url("postgresql://u@h/db") == "postgresql://u@h/db"
    for attrs in ("read-write", "primary"):
        kept = f"postgresql://h1,h2/db?target_session_attrs={attrs}"
        assert primary_url(kept) == kept


@pytest.mark.parametrize("attrs", ["any", "read-only", "standby", "prefer-standby"])
def test_several_hosts_that_may_settle_on_a_standby_are_refused(attrs: str) -> None:
    with pytest.raises(ConfigError, match=r"DATABASE_URL.*target_session_attrs"):
        Settings.from_env({**SECRETS,
                           "DATABASE_URL": f"postgresql://h1,h2/db?target_session_attrs={attrs}"})


def test_one_host_of_several_for_probing_keeps_the_credentials() -> None:
    url = "postgresql://u:pw@h1:1,h2:2/db?target_session_attrs=read-write&sslmode=disable"
    assert single_host_url(url, "h2:2") == "postgresql://u:pw@h2:2/db?sslmode=disable"
    sockets = "postgresql://u@/db?host=/a,/b&port=1,2"
    assert single_host_url(sockets, "/b") == "postgresql://u@/db?host=%2Fb&port=2"


def test_passwords_are_masked_in_multi_host_urls() -> None:
    assert masked_url("postgresql://u:secret@h1:1,h2:2/db") == "postgresql://u:***@h1:1,h2:2/db"


def test_read_database_url_is_optional_and_kept_out_of_repr() -> None:
    base = {**SECRETS, "DATABASE_URL": "postgresql://h/db"}
    assert Settings.from_env(base).read_database_url is None
    url = "postgresql://reader:hush@replica/db"
    settings = Settings.from_env({**base, "MIRROR_READ_DATABASE_URL": f"  {url} "})
    assert settings.read_database_url == url
    assert "hush" not in repr(settings)
