"""CONTRACT §10: the work is split over 128 partitions, which live process holds which is
visible in `mirror status` and the view mirror.partition_owners, and every table holding a
connection's data leads its primary key with connection_id (so a connection's data can live on
one shard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
import pytest

from mirror import progress
from mirror.db import migrate
from mirror.status import gather, ranges, render
from tests.logtools import append, project_all
from tests.signing import envelope

# Owners as `mirror project` names them: host:pid:worker.
A, B, C = "ingest-a:101:0", "proj-b:202:0", "proj-c:303:1"

PRIMARY_KEYS_SQL = """
SELECT c.relname AS table_name,
       (SELECT array_agg(a.attname::text ORDER BY k.n)
        FROM pg_index i
        CROSS JOIN unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = c.oid AND i.indisprimary) AS key
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'mirror' AND c.relkind IN ('r', 'p')
  AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
              AND a.attname = 'connection_id' AND NOT a.attisdropped)
ORDER BY 1
"""


def mirror(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "MIRROR_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "mirror", *args], env=env,
                          capture_output=True, text=True, timeout=120)


async def owners(conn: asyncpg.Connection) -> dict[str | None, list[int]]:
    out: dict[str | None, list[int]] = {}
    for row in await conn.fetch("SELECT partition, owner FROM mirror.partition_owners "
                                "ORDER BY partition"):
        out.setdefault(row["owner"], []).append(row["partition"])
    return out


async def test_every_table_of_a_connections_data_leads_its_key_with_connection_id(
        conn: asyncpg.Connection) -> None:
    keys = {r["table_name"]: r["key"] for r in await conn.fetch(PRIMARY_KEYS_SQL)}
    # The log, the projection tables, the registry's current-state relations and their
    # children, backfill and completion bookkeeping: all of them are checked.
    assert {"events", "states", "objects", "anomalies", "poison", "orders",
            "order_line_items", "backfill_progress", "completions"} <= set(keys)
    wrong = {table: key for table, key in keys.items() if not key or key[0] != "connection_id"}
    assert wrong == {}
    assert keys["events"] == ["connection_id", "position"]


async def test_a_body_naming_no_connection_is_logged_under_the_empty_connection(
        conn: asyncpg.Connection) -> None:
    await append(conn, {"event_type": "order.created", "data": {"id": "o1"}})
    row = await conn.fetchrow("SELECT connection_id, unusable_reason FROM mirror.events")
    assert (row["connection_id"], row["unusable_reason"]) == ("", "missing connection_id")


async def test_migrate_rekeys_a_log_keyed_by_position_alone(conn: asyncpg.Connection) -> None:
    # The log as an older schema made it: keyed by position, NULL where no connection is named.
    await conn.execute("""
        ALTER TABLE mirror.events DROP CONSTRAINT events_pkey;
        ALTER TABLE mirror.events ALTER COLUMN connection_id DROP NOT NULL;
        ALTER TABLE mirror.events ADD CONSTRAINT events_pkey PRIMARY KEY (position);
        DROP INDEX mirror.events_position;
        DELETE FROM mirror.meta WHERE key = 'schema';
    """)
    await append(conn, envelope("order.created", {"id": "o1"}),
                 {"event_type": "order.created", "data": {"id": "o2"}})
    await conn.execute("ALTER TABLE mirror.events DISABLE TRIGGER events_no_update_delete;"
                       "UPDATE mirror.events SET connection_id = NULL WHERE connection_id = '';"
                       "ALTER TABLE mirror.events ENABLE TRIGGER events_no_update_delete")
    assert await conn.fetchval("SELECT count(*) FROM mirror.events "
                               "WHERE connection_id IS NULL") == 1

    await migrate(conn)

    keys = {r["table_name"]: r["key"] for r in await conn.fetch(PRIMARY_KEYS_SQL)}
    assert keys["events"] == ["connection_id", "position"]
    assert sorted(r["connection_id"] for r in await conn.fetch(
        "SELECT connection_id FROM mirror.events")) == ["", "conn_1"]
    assert await conn.fetchval("SELECT to_regclass('mirror.events_position') IS NOT NULL")
    # The log is append-only again.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("UPDATE mirror.events SET connection_id = 'x'")
    await conn.execute("DELETE FROM mirror.meta WHERE key = 'schema'")
    await migrate(conn)  # and applying it again changes nothing
    assert {r["table_name"]: r["key"] for r in await conn.fetch(PRIMARY_KEYS_SQL)} == keys
    assert await conn.fetchval("SELECT count(*) FROM mirror.events") == 2


async def test_partition_owners_and_status_show_who_holds_which_partition(
        db_url: str, conn: asyncpg.Connection) -> None:
    assert progress.PARTITIONS >= 128
    assert await conn.fetchval("SELECT count(*) FROM mirror.partition_owners") \
        == progress.PARTITIONS
    assert await owners(conn) == {None: list(range(progress.PARTITIONS))}

    # A first worker takes everything; a second joins and the first gives up half; a third
    # joins and both give up their extras. Each renewal is one keep_leases round.
    assert len(await progress.keep_leases(conn, A)) == 128
    await progress.keep_leases(conn, B)
    await progress.keep_leases(conn, A)
    await progress.keep_leases(conn, B)
    assert sorted(len(p) for p in (await owners(conn)).values()) == [64, 64]
    await progress.keep_leases(conn, C)
    for name in (A, B, C, A, B, C):
        await progress.keep_leases(conn, name)
    held = await owners(conn)
    assert set(held) == {A, B, C}
    assert sorted(len(p) for p in held.values()) == [42, 43, 43]
    assert sorted(p for parts in held.values() for p in parts) == list(range(128))

    row = await conn.fetchrow("SELECT * FROM mirror.partition_owners WHERE owner = $1 "
                              "LIMIT 1", C)
    assert (row["host"], row["pid"], row["worker"]) == ("proj-c", 303, 1)
    assert row["checkpoint"] == "(0,0)" and row["lease_until"] is not None

    # Checkpoints move as pages are folded.
    await append(conn, envelope("order.created", {"id": "o1"}))
    await project_all(conn)
    moved = await conn.fetch("SELECT partition, last_position FROM mirror.partition_owners "
                             "WHERE last_position > 0")
    assert len(moved) == 1

    # The text and JSON forms of `mirror status` list every live holder and its partitions.
    out = mirror(db_url, "status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["partitions"] == 128
    assert {w["owner"]: w["parts"] for w in report["leases"]} == held
    assert {w["owner"]: w["partitions"] for w in report["leases"]} == \
        {k: len(v) for k, v in held.items()}
    text = mirror(db_url, "status").stdout
    assert "partitions:           128, leased by 3 worker(s)" in text
    for name, parts in held.items():
        assert f"  {name}: {len(parts)} partitions ({ranges(parts)})" in text

    # A holder that stops renewing is no longer shown as holding anything.
    await conn.execute("UPDATE mirror.checkpoints SET lease_until = now() - interval '1 s' "
                       "WHERE owner = $1", A)
    assert A not in await owners(conn)
    assert A not in {w["owner"] for w in (await gather(conn))["leases"]}
    assert len((await owners(conn))[None]) == len(held[A])
    # A clean stop gives everything back at once.
    await progress.release_leases(conn, B)
    assert set(await owners(conn)) == {None, C}
    assert render(await gather(conn)).count("partitions (") == 1


def test_ranges_compacts_runs() -> None:
    assert ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert ranges([]) == "" and ranges([3]) == "3"
