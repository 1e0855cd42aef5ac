"""Settings: one frozen object built from the environment at the edge, passed everywhere else."""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mirror.errors import ConfigError

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 10
SECRET_PREFIX = "whsec_"
MIN_API_TOKEN = 16
DEFAULT_TRACKSTAR_BASE_URL = "https://production.trackstarhq.com"


def trackstar_base_url(env: Mapping[str, str]) -> str:
    """``MIRROR_TRACKSTAR_BASE_URL`` (default: Trackstar's production API), checked to be an
    http(s) URL, without a trailing slash."""
    base = (env.get("MIRROR_TRACKSTAR_BASE_URL") or "").strip() or DEFAULT_TRACKSTAR_BASE_URL
    parts = urlsplit(base)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"MIRROR_TRACKSTAR_BASE_URL has a bad port, got {base!r}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname or "@" in parts.netloc \
            or parts.query or parts.fragment:
        raise ConfigError("MIRROR_TRACKSTAR_BASE_URL must be an http(s) URL without "
                          f"credentials, query or fragment, got {base!r}")
    return base.rstrip("/")


def parse_webhook_secrets(raw: str, variable: str = "MIRROR_WEBHOOK_SECRET") -> tuple[str, ...]:
    """Split a space- or comma-separated list of Svix secrets and check each one.

    A secret is ``whsec_`` followed by base64 of at least 16 bytes. The error names the
    variable but never echoes the value.
    """
    parts = tuple(p for p in re.split(r"[\s,]+", raw.strip()) if p)
    if not parts:
        raise ConfigError(
            f"{variable} is empty: set it to the endpoint's signing secret (whsec_...)")
    for index, secret in enumerate(parts, start=1):
        if not secret.startswith(SECRET_PREFIX):
            raise ConfigError(f"{variable}: secret #{index} does not start with {SECRET_PREFIX!r}")
        body = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{variable}: secret #{index} is not valid base64") from None
        if len(key) < 16:
            raise ConfigError(f"{variable}: secret #{index} is too short (under 16 bytes)")
    return parts


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env: Mapping[str, str]) -> str:
    """``MIRROR_LOG_LEVEL`` (default INFO); read before anything else, to set up logging."""
    raw = env.get("MIRROR_LOG_LEVEL", "").strip().upper() or "INFO"
    if raw not in LOG_LEVELS:
        raise ConfigError(f"MIRROR_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return raw


def data_dir(env: Mapping[str, str]) -> Path:
    """``MIRROR_DATA_DIR`` (default ``.data``): where `make up` keeps the embedded server and
    the generated secrets. Needed before DATABASE_URL is known (it may point there)."""
    return Path(env.get("MIRROR_DATA_DIR", "").strip() or ".data")


def read_database_url(env: Mapping[str, str]) -> str | None:
    """``MIRROR_READ_DATABASE_URL``: a hot standby for reads; None means read the primary."""
    return env.get("MIRROR_READ_DATABASE_URL", "").strip() or None


def listen_address(env: Mapping[str, str]) -> tuple[str, int]:
    """``MIRROR_HOST`` (default 127.0.0.1) and ``MIRROR_PORT`` (default 8080)."""
    host = env.get("MIRROR_HOST", "127.0.0.1").strip() or "127.0.0.1"
    return host, _int(env, "MIRROR_PORT", 8080, 0, 65535)


def webhook_url(host: str, port: int) -> str:
    """The URL of POST /webhooks on a service listening on ``host``:``port`` (a wildcard
    address is reached on the loopback)."""
    shown = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
    return f"http://{shown}:{port}/webhooks"


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


# What a multi-host DATABASE_URL may ask for: the mirror writes, so only a primary will do.
WRITABLE_SESSION_ATTRS = ("read-write", "primary")


def _query_list(query: list[tuple[str, str]], key: str) -> list[str]:
    values = [value for k, value in query if k == key]
    return [item for item in values[-1].split(",") if item] if values else []


def url_hosts(url: str) -> list[str]:
    """The hosts of a ``postgresql://`` URL, in the order given: ``host[:port]`` entries of
    the authority, or else the ``host`` query parameter's list (socket directories, say)."""
    if "://" not in url:
        return []
    parts = urlsplit(url)
    hosts = [host for host in parts.netloc.rpartition("@")[2].split(",") if host]
    if hosts:
        return hosts
    return _query_list(parse_qsl(parts.query, keep_blank_values=True), "host")


def primary_url(url: str, variable: str = "DATABASE_URL") -> str:
    """``url``, made to reach only a primary when it names several hosts.

    With several hosts, the driver tries them in order on every (re)connect and keeps the
    first that matches ``target_session_attrs``; that is how the mirror finds the new primary
    after a failover. Unset, it means ``read-write`` here (libpq's default, ``any``, would
    happily settle on a standby, where every write fails); ``read-only`` or ``standby`` is a
    configuration error.
    """
    if len(url_hosts(url)) < 2:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    attrs = [value for key, value in query if key == "target_session_attrs"]
    if not attrs:
        extra = "target_session_attrs=read-write"
        return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))
    if attrs[-1] not in WRITABLE_SESSION_ATTRS:
        raise ConfigError(f"{variable} names several hosts: target_session_attrs must be one of "
                          f"{', '.join(WRITABLE_SESSION_ATTRS)} (the mirror writes), got "
                          f"{attrs[-1]!r}")
    return url


def single_host_url(url: str, host: str) -> str:
    """``url`` reaching only ``host`` (one of ``url_hosts(url)``), whatever its role."""
    parts = urlsplit(url)
    user, at, authority = parts.netloc.rpartition("@")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != "target_session_attrs"]
    if authority:
        return urlunsplit(parts._replace(netloc=f"{user}{at}{host}", query=urlencode(query)))
    hosts = _query_list(query, "host")
    ports = _query_list(query, "port")
    index = hosts.index(host)
    single = {"host": host}
    if len(ports) == len(hosts):
        single["port"] = ports[index]
    query = [(k, single.get(k, v)) for k, v in query]
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to run; see the README's variables table."""

    database_url: str
    webhook_secrets: tuple[str, ...] = field(repr=False)
    api_token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = DEFAULT_MAX_BODY
    workers: int = 1
    batch_size: int = 2000
    poll_interval: float = 1.0
    db_timeout: float = 5.0
    # How long a client may take to send a request's headers, or its body; also how long an
    # idle keep-alive connection stays open. Slow clients are cut off after it.
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    # 'process': projection workers in a child process, so folds never hold the ingress's
    # event loop; 'inline': in the service's own event loop (tests, tiny setups).
    projector: str = "process"
    # Ingress processes sharing the port (SO_REUSEPORT); verification and parsing are CPU
    # work, so one per core.
    ingress_processes: int = 1      # 0: chosen by `mirror serve` from the cores (processes.py)
    # The Trackstar REST API: with a key, the service completes truncated deliveries itself
    # (mirror.trackstar.completion). The key is sent to trackstar_base_url's host only.
    trackstar_api_key: str = field(default="", repr=False)
    trackstar_base_url: str = DEFAULT_TRACKSTAR_BASE_URL
    # A hot standby for the read API and `mirror as-of`/`history`; None: read the primary.
    read_database_url: str | None = field(default=None, repr=False)
    # Run the event loop on uvloop (MIRROR_UVLOOP=0: asyncio's own).
    uvloop: bool = True
    # Where every process of `mirror serve` records its Prometheus figures, so /metrics reports
    # their sum (PROMETHEUS_MULTIPROC_DIR, set by `mirror serve`); None: this process alone.
    metrics_dir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, database_url: str | None = None,
                 require_secrets: bool = True) -> Settings:
        """Build settings from the environment, failing with a message naming the variable."""
        env = os.environ if env is None else env
        url = database_url or env.get("DATABASE_URL", "").strip()
        if not url:
            raise ConfigError("DATABASE_URL is not set (make up starts an embedded server)")
        url = primary_url(url)
        raw_secret = env.get("MIRROR_WEBHOOK_SECRET")
        if raw_secret is None:
            if require_secrets:
                raise ConfigError("MIRROR_WEBHOOK_SECRET is not set: refusing to accept webhooks "
                                  "without a signing secret")
            secrets_: tuple[str, ...] = ()
        else:
            secrets_ = parse_webhook_secrets(raw_secret)
        token = env.get("MIRROR_API_TOKEN", "").strip()
        if require_secrets and len(token) < MIN_API_TOKEN:
            raise ConfigError(f"MIRROR_API_TOKEN must be set to a token of at least "
                              f"{MIN_API_TOKEN} characters")
        host, port = listen_address(env)
        return cls(
            database_url=url,
            webhook_secrets=secrets_,
            api_token=token,
            host=host,
            port=port,
            max_body_bytes=_int(env, "MIRROR_MAX_BODY_BYTES", DEFAULT_MAX_BODY, 1024, 1 << 30),
            workers=_int(env, "MIRROR_WORKERS", 1, 1, 16),
            batch_size=_int(env, "MIRROR_BATCH_SIZE", 2000, 1, 100_000),
            request_timeout=_int(env, "MIRROR_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT, 1, 300),
            db_timeout=float(_int(env, "MIRROR_DB_TIMEOUT", 5, 1, 60)),
            projector=_choice(env, "MIRROR_PROJECTOR", ("process", "inline"), "process"),
            ingress_processes=_int(env, "MIRROR_INGRESS_PROCESSES", 0, 0, 64),
            trackstar_api_key=(env.get("MIRROR_TRACKSTAR_API_KEY") or "").strip(),
            trackstar_base_url=trackstar_base_url(env),
            read_database_url=read_database_url(env),
            uvloop=_flag(env, "MIRROR_UVLOOP", True),
            metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR", "").strip() or None,
        )


def masked_url(url: str) -> str:
    """The connection string with any password replaced by ``***``."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def ensure_local_secrets(data_dir: Path) -> dict[str, Path]:
    """Create (once) and return the files holding the local test secret and API token.

    Used only by ``make up`` for local runs; real deployments set the variables.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "MIRROR_WEBHOOK_SECRET": data_dir / "webhook_secret",
        "MIRROR_API_TOKEN": data_dir / "api_token",
    }
    makers = {
        "MIRROR_WEBHOOK_SECRET": lambda: SECRET_PREFIX
        + base64.b64encode(secrets.token_bytes(24)).decode(),
        "MIRROR_API_TOKEN": lambda: secrets.token_urlsafe(32),
    }
    for name, path in files.items():
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(makers[name]() + "\n")
    return files
