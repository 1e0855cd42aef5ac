"""Helpers for integration tests: append envelopes to the log, project, snapshot relations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from mirror import parsing
from mirror.eventlog import Record, insert_records
from mirror.progress import PARTITIONS
from mirror.projector import project_page
from mirror.sample import message_id
from projections import registry


def record(event: dict[str, Any], msg_id: str | None = None,
           received_at: datetime | None = None) -> Record:
    """A log record for ``event`` as the ingress would build it."""
    parsed = parsing.parse(orjson.dumps(event))
    when = received_at or datetime.now(UTC)
    return Record(msg_id or message_id(when), when, when, "webhook", parsed)


async def append(conn: asyncpg.Connection, *events: dict[str, Any] | Record) -> list[Record]:
    records = [e if isinstance(e, Record) else record(e) for e in events]
    await insert_records(conn, records)
    return records


PENDING_SQL = """
SELECT count(*) FROM mirror.unprojected_events
WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
"""


async def project_all(conn: asyncpg.Connection, batch_size: int = 500) -> int:
    """Run batches on every partition until every visible event is projected (also when a
    live worker holds a partition for a while); return the rows this call consumed."""
    total = 0
    while True:
        done = await project_page(conn, list(range(PARTITIONS)), page_size=batch_size)
        total += done
        if done == 0:
            if await conn.fetchval(PENDING_SQL) == 0:
                return total
            await asyncio.sleep(0.01)


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every projected relation's rows, sorted, for equality comparisons."""
    tables = ["versions", "changes", "objects", "states"]
    for resource in registry.resources():
        tables.append(resource.table)
        tables += [c.table for c in resource.children]
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in tables:
        rows = await conn.fetch(f"SELECT * FROM mirror.{table}")
        cleaned = []
        for row in rows:
            values = dict(row)
            values.pop("position", None)  # log positions depend on arrival order
            cleaned.append(tuple(sorted((k, orjson.dumps(v, default=str)) for k, v in
                                        values.items())))
        out[table] = sorted(cleaned)
    anomalies = await conn.fetch(
        "SELECT resource, connection_id, object_id, kind, at, event_id, paths "
        "FROM mirror.anomalies WHERE resolved_at IS NULL ORDER BY 1, 2, 3, 4, 5, 6")
    out["anomalies"] = [tuple(r) for r in anomalies]
    return out
