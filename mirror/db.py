"""The database edge: pools and connections, the migration, and the translation of asyncpg's
connectivity failures into DatabaseUnavailable.

Only the modules that own SQL run it, through the pools and connections made here: the event log
(eventlog), the projection (store, projector, progress, rebuild), the point-in-time reads
(history, explore), status, and the Trackstar runners' bookkeeping (trackstar/). This module also
knows where each kind of work goes: writes to the primary (found again on every reconnect when
DATABASE_URL names several hosts), reads to the read replica when one is configured and
reachable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any, TypeVar

import asyncpg

from mirror.errors import DatabaseUnavailable
from mirror.parsing import dumps, loads
from mirror.settings import single_host_url, url_hosts
from projections import registry
from projections.base import Column, Resource

# Both ship inside the package (package data), so an installed wheel migrates too.
SCHEMA_FILE = files("mirror") / "schema.sql"
HISTORY_FILE = files("mirror") / "history.sql"
_MIGRATE_LOCK = 7_205_001  # advisory lock key: one migration at a time
# The projection engine's generation. When the stored one differs, `migrate` drops what the
# projections built (never the log, never reconcile's drift anomalies) and re-partitions the
# log; the workers then fold everything again from mirror.events.
ENGINE = "2"

T = TypeVar("T")
log = logging.getLogger("mirror.db")

# SQLSTATE classes that mean "the server is not there or not usable right now".
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# read_only_sql_transaction: a write reached a server that is (now) a standby. Not the
# statement's fault: the primary is elsewhere, and a reconnect will find it.
_UNAVAILABLE_STATES = ("25006",)
# A standby cancels a query whose rows recovery must remove (hot_standby_feedback off).
_RECOVERY_CONFLICT = "40001"
# Reads go to the primary for this long after the read replica failed, then it is tried again.
REPLICA_RETRY_SECONDS = 5.0
READ_APPLICATION_NAME = "mirror-read"
_READ_ONLY_SESSION_SQL = ("SET default_transaction_read_only = on; "
                          "SET application_name = 'mirror-read'")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached, rather than a bad statement."""
    if isinstance(exc, OSError | asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
    return False


async def guarded(call: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``call``, turning every connectivity failure into DatabaseUnavailable."""
    try:
        return await call()
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        raise


def json_text(value: Any) -> str | None:
    """JSON text of ``value`` for a text parameter cast to jsonb; None stays SQL NULL."""
    return None if value is None else dumps(value)


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb and json values travel as Python objects on every connection."""
    for name in ("jsonb", "json"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=dumps,
                                  decoder=loads, format="text")


def _read_only_settings() -> dict[str, str]:
    # Every transaction of a read connection is read-only, so nothing can write through it,
    # even when the read URL reaches a primary (a promoted replica, a configuration slip).
    return {"default_transaction_read_only": "on", "application_name": READ_APPLICATION_NAME}


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10,
                      timeout: float = 5.0, read_only: bool = False) -> asyncpg.Pool:
    """A pool whose connects and statements give up after ``timeout`` seconds.

    Creating the pool does not require the server to be up: connections are opened lazily, so
    the service can start (and answer 503) while PostgreSQL is down, and recover by itself.
    Every new connection goes through the URL's host list again, so after a failover the pool
    reaches the promoted primary: a connection the server closed (the old primary died) is
    found closed at the next acquire and replaced, never handed out.
    """
    return await asyncpg.create_pool(
        url, min_size=0, max_size=max_size, timeout=timeout, command_timeout=timeout * 2,
        max_inactive_connection_lifetime=60.0, init=init_connection,
        server_settings=_read_only_settings() if read_only else None,
    )


def resource_ddl(resource: Resource) -> list[str]:
    """CREATE/ALTER statements for a resource's current-state relation and its children.

    Identifiers come from the registry and are checked against ``[a-z_][a-z0-9_]*`` there.
    """

    def coldefs(columns: tuple[Column, ...]) -> list[str]:
        return [f"ALTER TABLE mirror.{{t}} ADD COLUMN IF NOT EXISTS {c.name} {c.sql_type}"
                for c in columns]

    table = resource.table
    out = [
        f"""CREATE TABLE IF NOT EXISTS mirror.{table} (
            connection_id text COLLATE "C" NOT NULL,
            id text COLLATE "C" NOT NULL,
            data jsonb NOT NULL,
            created_date timestamptz,
            updated_date timestamptz,
            valid_from timestamptz NOT NULL,
            event_id text NOT NULL,
            PRIMARY KEY (connection_id, id))""",
        f"CREATE INDEX IF NOT EXISTS {table}_id ON mirror.{table} (id)",
        f"CREATE INDEX IF NOT EXISTS {table}_updated ON mirror.{table} (updated_date)",
        # table_as_of: the objects whose current version had begun by a given time.
        f"CREATE INDEX IF NOT EXISTS {table}_valid_from ON mirror.{table} (valid_from)",
    ]
    out += [s.format(t=table) for s in coldefs(resource.columns)]
    for child in resource.children:
        out.append(
            f"""CREATE TABLE IF NOT EXISTS mirror.{child.table} (
                connection_id text COLLATE "C" NOT NULL,
                {child.parent_column} text COLLATE "C" NOT NULL,
                line_number integer NOT NULL,
                data jsonb NOT NULL,
                PRIMARY KEY (connection_id, {child.parent_column}, line_number))"""
        )
        out += [s.format(t=child.table) for s in coldefs(child.columns)]
    return out


async def migrate(conn: asyncpg.Connection) -> None:
    """Apply schema.sql and the registry's relations; idempotent and safe to run concurrently."""
    sql = SCHEMA_FILE.read_text()
    ddl = [s for r in registry.resources() for s in resource_ddl(r)]
    digest = hashlib.sha256("\n".join(
        [ENGINE, sql, HISTORY_FILE.read_text(), *ddl,
         *[f"{r.name}={r.table}" for r in registry.resources()]]).encode()).hexdigest()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        # Unchanged since the last migration: apply nothing. Re-running DDL would take
        # exclusive locks on live relations (a worker starting beside readers could deadlock).
        if await conn.fetchval("SELECT to_regclass('mirror.meta') IS NOT NULL") and \
                await conn.fetchval("SELECT value FROM mirror.meta WHERE key = 'schema'") \
                == digest:
            return
        await _reset_older_engine(conn)
        await conn.execute(sql)
        for statement in ddl:
            await conn.execute(statement)
        # Functions that read the registry-made relations come last.
        await conn.execute(HISTORY_FILE.read_text())
        await conn.executemany(
            "INSERT INTO mirror.resources (name, table_name) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET table_name = EXCLUDED.table_name",
            [(r.name, r.table) for r in registry.resources()])
        await conn.execute(
            "INSERT INTO mirror.meta (key, value) VALUES ('engine', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", ENGINE)
        await conn.execute(
            "INSERT INTO mirror.meta (key, value) VALUES ('schema', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", digest)
        if await conn.fetchval("SELECT to_regclass('pg_temp.anomalies_engine1') IS NOT NULL"):
            await conn.execute(
                "INSERT INTO mirror.anomalies (connection_id, resource, object_id, kind, at, "
                "event_id, paths, detail, detected_at, resolved_at, resolved_by) "
                "SELECT connection_id, resource, object_id, kind, at, event_id, paths, detail, "
                "detected_at, resolved_at, resolved_by FROM pg_temp.anomalies_engine1 "
                "ON CONFLICT DO NOTHING")
            await conn.execute("DROP TABLE pg_temp.anomalies_engine1")


async def _reset_older_engine(conn: asyncpg.Connection) -> None:
    """Drop the projections an older engine built, keeping the log and reconcile's drift."""
    if not await conn.fetchval("SELECT to_regclass('mirror.events') IS NOT NULL"):
        return  # a fresh database
    if await conn.fetchval("SELECT to_regclass('mirror.meta') IS NOT NULL") and \
            await conn.fetchval("SELECT value FROM mirror.meta WHERE key = 'engine'") == ENGINE:
        return
    await conn.execute("CREATE TEMP TABLE anomalies_engine1 ON COMMIT DROP AS "
                       "SELECT * FROM mirror.anomalies WHERE kind = 'drift'")
    for name in ("versions", "changes", "unprojected_events", "states", "anomalies",
                 "objects", "poison", "checkpoints"):
        kind = await conn.fetchval(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass('mirror.' || $1)", name)
        if kind is not None:
            what = "VIEW" if kind == b"v" or kind == "v" else "TABLE"
            await conn.execute(f"DROP {what} IF EXISTS mirror.{name} CASCADE")
    for resource in registry.resources():
        for name in (resource.table, *[c.table for c in resource.children]):
            await conn.execute(f"DROP TABLE IF EXISTS mirror.{name} CASCADE")
    await conn.execute("ALTER TABLE mirror.events DROP COLUMN IF EXISTS part")


async def _open(url: str, timeout: float, read_only: bool) -> asyncpg.Connection:
    conn = await guarded(lambda: asyncpg.connect(url, timeout=timeout))
    await init_connection(conn)
    if read_only:
        # Set after connecting, not at startup: a URL asking for target_session_attrs=
        # read-write (the primary, as a fallback) would otherwise refuse every host.
        await conn.execute(_READ_ONLY_SESSION_SQL)
    return conn


@asynccontextmanager
async def connect(url: str, timeout: float = 5.0, *,
                  read_only: bool = False) -> AsyncIterator[asyncpg.Connection]:
    """One connection, closed afterwards; connectivity failures raise DatabaseUnavailable."""
    conn = await _open(url, timeout, read_only)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def connect_for_reading(read_url: str | None, primary: Callable[[], str], *,
                              timeout: float = 5.0,
                              warn: Callable[[str], None] | None = None,
                              ) -> AsyncIterator[asyncpg.Connection]:
    """A read-only connection to the read replica, or to the primary when there is none or
    it cannot be reached (``warn`` is told why). ``primary`` gives the primary's URL, asked
    only when needed."""
    conn = None
    if read_url:
        try:
            conn = await _open(read_url, timeout, True)
        except DatabaseUnavailable as exc:
            if warn is not None:
                warn(f"read replica unreachable ({exc}); reading from the primary")
    if conn is None:
        conn = await _open(primary(), timeout, True)
    try:
        yield conn
    finally:
        await conn.close()


REPLICA_LAG_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN NOT pg_is_in_recovery() THEN 0.0
            -- Everything received is replayed and the stream is live: nothing to wait for,
            -- however long ago the last transaction was.
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
                 AND (SELECT status FROM pg_stat_wal_receiver) = 'streaming' THEN 0.0
            ELSE greatest(0.0, coalesce(extract(epoch FROM
                     clock_timestamp() - pg_last_xact_replay_timestamp()), 0.0))
       END::float8 AS lag_seconds
"""


async def replica_lag(conn: asyncpg.Connection) -> dict[str, Any]:
    """How far a read replica is behind: ``lag_seconds`` (0 when caught up, or when it is a
    primary) and ``in_recovery`` (true for a standby)."""
    row = await conn.fetchrow(REPLICA_LAG_SQL)
    assert row is not None
    return {"in_recovery": row["in_recovery"], "lag_seconds": round(row["lag_seconds"], 3)}


async def _role(url: str, timeout: float) -> str:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url, timeout=timeout), timeout)
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    try:
        standby = await conn.fetchval("SELECT pg_is_in_recovery()", timeout=timeout)
        return "standby (read-only)" if standby else "primary"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    finally:
        conn.terminate()


async def probe_hosts(url: str, timeout: float = 1.0) -> dict[str, str]:
    """What each host of ``url`` is right now: ``primary``, ``standby (read-only)`` or
    ``unreachable (…)``; all asked at once, each within ``timeout`` seconds."""
    hosts = url_hosts(url)
    roles = await asyncio.gather(*(_role(single_host_url(url, h), timeout) for h in hosts))
    return dict(zip(hosts, roles, strict=True))


def explain(hosts: dict[str, str]) -> str:
    """One sentence on why no writable database is reachable, from ``probe_hosts``."""
    if any(role == "primary" for role in hosts.values()):
        return "a primary answers again; reconnecting to it"
    if any(role.startswith("standby") for role in hosts.values()):
        return ("no primary among the configured hosts (only standbys answer): waiting for "
                "one to be promoted")
    return "no configured database host answers"


class Reader:
    """Where reads go: the read replica when one is configured and answers, else the primary.

    A read that fails on the replica because it cannot be reached (or because recovery
    cancelled it) is run again on the primary, and the replica is left alone for
    ``REPLICA_RETRY_SECONDS`` so a dead replica does not cost every read a connect timeout.
    Reads are idempotent, so running one twice is harmless.
    """

    def __init__(self, primary: asyncpg.Pool, replica: asyncpg.Pool | None, *,
                 timeout: float = 5.0) -> None:
        self._primary = primary
        self._replica = replica
        self._timeout = timeout
        self._skip_until = 0.0
        self.last_error: str | None = None

    @property
    def falling_back(self) -> bool:
        """True while reads go to the primary because the replica failed."""
        return self._replica is not None and time.monotonic() < self._skip_until

    def _replica_failed(self, exc: BaseException) -> None:
        if not self.falling_back:
            log.warning("read replica unreachable, reading from the primary",
                        extra={"error": type(exc).__name__})
        self.last_error = type(exc).__name__
        self._skip_until = time.monotonic() + REPLICA_RETRY_SECONDS

    async def run(self, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``read`` on a read connection; DatabaseUnavailable when neither can serve it."""
        if self._replica is not None and not self.falling_back:
            try:
                async with self._replica.acquire(timeout=self._timeout) as conn:
                    return await read(conn)
            except Exception as exc:
                state = getattr(exc, "sqlstate", None)
                # A write refused by the read-only session is a bug to surface, never a
                # reason to run it on the primary.
                if is_unavailable(exc) and state not in _UNAVAILABLE_STATES:
                    self._replica_failed(exc)
                elif state != _RECOVERY_CONFLICT:
                    raise

        async def on_primary() -> T:
            async with self._primary.acquire(timeout=self._timeout) as conn:
                return await read(conn)

        return await guarded(on_primary)

    async def replica_status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The read replica's state for /readyz: reachable or not, and its replay lag;
        None when there is no read replica."""
        if self._replica is None:
            return None
        try:
            async with asyncio.timeout(timeout), self._replica.acquire() as conn:
                status: dict[str, Any] = {"status": "ok", **await replica_lag(conn)}
            self._skip_until = 0.0
            status["reads"] = "replica"
            return status
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._replica_failed(exc)
            return {"status": "unreachable", "error": type(exc).__name__,
                    "reads": "primary (fallback while the replica is unreachable)"}

    async def close(self) -> None:
        """Close the replica's pool (the primary's belongs to the caller)."""
        if self._replica is not None:
            await self._replica.close()
