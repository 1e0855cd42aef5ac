"""The database edge: pools, migrations and the translation of asyncpg errors.

Only the modules that own the database (log, projector, history, status) run SQL, through the
pool made here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from mirror.envelope import dumps, loads
from mirror.errors import DatabaseUnavailable
from projections import registry
from projections.base import Column, Resource

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema.sql"
HISTORY_FILE = Path(__file__).resolve().parent / "history.sql"
_MIGRATE_LOCK = 7_205_001  # advisory lock key: one migration at a time
# The projection engine's generation. When the stored one differs, `migrate` drops what the
# projections built (never the log, never reconcile's drift anomalies) and re-partitions the
# log; the workers then fold everything again from mirror.events.
ENGINE = "2"

T = TypeVar("T")

# SQLSTATE classes that mean "the server is not there or not usable right now".
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached, rather than a bad statement."""
    if isinstance(exc, OSError | asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _UNAVAILABLE_CLASSES
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


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10,
                      timeout: float = 5.0) -> asyncpg.Pool:
    """A pool whose connects and statements give up after ``timeout`` seconds.

    Creating the pool does not require the server to be up: connections are opened lazily, so
    the service can start (and answer 503) while PostgreSQL is down, and recover by itself.
    """
    return await asyncpg.create_pool(
        url, min_size=0, max_size=max_size, timeout=timeout, command_timeout=timeout * 2,
        max_inactive_connection_lifetime=60.0, init=init_connection,
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
            connection_id text NOT NULL,
            id text NOT NULL,
            data jsonb NOT NULL,
            created_date timestamptz,
            updated_date timestamptz,
            valid_from timestamptz NOT NULL,
            event_id text NOT NULL,
            PRIMARY KEY (connection_id, id))""",
        f"CREATE INDEX IF NOT EXISTS {table}_id ON mirror.{table} (id)",
        f"CREATE INDEX IF NOT EXISTS {table}_updated ON mirror.{table} (updated_date)",
        # table_as_of: the versions alive at a time, without reading every version before it.
        f"CREATE INDEX IF NOT EXISTS states_alive_{resource.name} ON mirror.states USING gist "
        f"(tstzrange(valid_from, valid_to)) WHERE wins AND resource = '{resource.name}'",
    ]
    out += [s.format(t=table) for s in coldefs(resource.columns)]
    for child in resource.children:
        out.append(
            f"""CREATE TABLE IF NOT EXISTS mirror.{child.table} (
                connection_id text NOT NULL,
                {child.parent_column} text NOT NULL,
                line_number integer NOT NULL,
                data jsonb NOT NULL,
                PRIMARY KEY (connection_id, {child.parent_column}, line_number))"""
        )
        out += [s.format(t=child.table) for s in coldefs(child.columns)]
    return out


async def migrate(conn: asyncpg.Connection) -> None:
    """Apply schema.sql and the registry's relations; idempotent and safe to run concurrently."""
    sql = SCHEMA_FILE.read_text()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await _reset_older_engine(conn)
        await conn.execute(sql)
        for resource in registry.resources():
            for statement in resource_ddl(resource):
                await conn.execute(statement)
        # Functions that read the registry-made relations come last.
        history_sql = HISTORY_FILE
        await conn.execute(history_sql.read_text())
        await conn.executemany(
            "INSERT INTO mirror.resources (name, table_name) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET table_name = EXCLUDED.table_name",
            [(r.name, r.table) for r in registry.resources()])
        await conn.execute(
            "INSERT INTO mirror.meta (key, value) VALUES ('engine', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", ENGINE)
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
    await conn.execute("DROP VIEW IF EXISTS mirror.versions")
    await conn.execute("CREATE TEMP TABLE anomalies_engine1 ON COMMIT DROP AS "
                       "SELECT * FROM mirror.anomalies WHERE kind = 'drift'")
    for table in ("versions", "states", "changes", "anomalies", "objects", "poison",
                  "checkpoints"):
        await conn.execute(f"DROP TABLE IF EXISTS mirror.{table} CASCADE")
    for resource in registry.resources():
        for name in (resource.table, *[c.table for c in resource.children]):
            await conn.execute(f"DROP TABLE IF EXISTS mirror.{name} CASCADE")
    await conn.execute("ALTER TABLE mirror.events DROP COLUMN IF EXISTS part")


@asynccontextmanager
async def connect(url: str, timeout: float = 5.0) -> AsyncIterator[asyncpg.Connection]:
    """One connection, closed afterwards; connectivity failures raise DatabaseUnavailable."""
    conn = await guarded(lambda: asyncpg.connect(url, timeout=timeout))
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()
