"""The history explorer's reads: search, an object's timeline with its changes and anomalies,
and the overview figures (README: "History explorer").

Every statement is a constant (the per-resource ones are built once from the registry, whose
identifiers are checked there); request input only ever travels as a bind parameter. Versions
come from ``mirror.object_history`` and states from ``mirror.object_as_of``, never from the
versions table, whose layout belongs to the projection engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import asyncpg

from mirror import history
from mirror.errors import AmbiguousObject
from mirror.progress import projection_lag
from projections import registry
from projections.base import Resource

SEARCH_LIMIT = 20
PAGE_DEFAULT = 1000
PAGE_MAX = 1000
# The typed columns a person searches by, besides the id, in the order they label a result.
_LABEL_COLUMNS = ("order_number", "sku", "name", "purchase_order_number", "status")
_SEARCH_COLUMNS = ("order_number", "sku")


@dataclass(frozen=True)
class _SearchStatement:
    resource: str
    sql: str


@cache
def _search_statements() -> tuple[_SearchStatement, ...]:
    """One search statement per resource: id (exact or prefix), and for the resources that have
    them, order number or SKU (prefix, case-insensitive; a leading ``#`` is ignored)."""
    out = []
    for resource in registry.resources():
        out.append(_SearchStatement(resource.name, _search_sql(resource)))
    return tuple(out)


def _search_sql(resource: Resource) -> str:
    names = {c.name for c in resource.columns}
    matches = ["t.id = $1", "starts_with(lower(t.id), lower($1))"]
    matches += [f"(ltrim($1, '#') <> '' AND "
                f"starts_with(lower(ltrim(t.{c}, '#')), lower(ltrim($1, '#'))))"
                for c in _SEARCH_COLUMNS if c in names]
    label = next((f"t.{c}" for c in _LABEL_COLUMNS if c in names), "NULL::text")
    status = "t.status" if "status" in names else "NULL::text"
    return f"""
SELECT t.connection_id, t.id, {label}::text AS label, {status}::text AS status, t.updated_date
FROM mirror.{resource.table} t
WHERE {" OR ".join(matches)}
ORDER BY (t.id = $1) DESC, t.updated_date DESC NULLS LAST, t.id
LIMIT $2
"""


# An id in several connections: each of them, from the log.
_SEARCH_LOG_SQL = """
SELECT DISTINCT e.connection_id
FROM mirror.events e
WHERE e.resource = $1 AND e.object_id = $2 AND e.connection_id IS NOT NULL
LIMIT $3
"""


async def search(conn: asyncpg.Connection, text: str, resource: str | None = None,
                 limit: int = SEARCH_LIMIT) -> list[dict[str, Any]]:
    """Objects whose id starts with ``text`` (or whose order number or SKU does), in
    ``resource`` or in every resource; exact id matches first."""
    found: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for statement in _search_statements():
        if resource is not None and statement.resource != resource:
            continue
        for row in await conn.fetch(statement.sql, text, limit):
            seen.add((statement.resource, row["connection_id"], row["id"]))
            found.append({
                "resource": statement.resource, "connection_id": row["connection_id"],
                "id": row["id"], "label": row["label"], "status": row["status"],
                "updated_date": _iso(row["updated_date"]), "current": True,
            })
        if any(k[0] == statement.resource and k[2] == text for k in seen):
            continue
        # Objects no longer in their current-state relation (deleted) are still found by
        # their exact id, through the history (one index probe).
        try:
            connection, _ = await history.object_as_of(conn, statement.resource, text,
                                                       None)
            connections = [connection] if connection is not None else []
        except AmbiguousObject:
            connections = [r["connection_id"] for r in
                           await conn.fetch(_SEARCH_LOG_SQL, statement.resource, text, limit)]
        for connection in connections:
            seen.add((statement.resource, connection, text))
            found.append({"resource": statement.resource, "connection_id": connection,
                          "id": text, "label": None, "status": None, "updated_date": None,
                          "current": False})
    # Exact ids first, then the rest in the order found; at most ``limit`` in all.
    found.sort(key=lambda r: r["id"] != text)
    return found[:limit]


# One page of versions, each with its field changes: the rows of mirror.changes at its instant
# (one jsonb array per version, so 1,000 versions decode as 1,000 values, not one per field).
_PAGE_SQL = """
WITH h AS (
    SELECT valid_from, valid_to, data IS NULL AS deleted, event_id, event_type, derived
    FROM mirror.object_history($1, $2, $3)
), page AS (
    SELECT * FROM h
    WHERE $4::timestamptz IS NULL OR h.valid_from < $4
    ORDER BY h.valid_from DESC
    LIMIT $5
), changed AS (
    SELECT c.changed_at,
           jsonb_agg(jsonb_build_object('path', c.path, 'old', c.old_value, 'new', c.new_value)
                     ORDER BY c.path) AS changes
    FROM mirror.changes c
    WHERE c.resource = $1 AND c.connection_id = $3 AND c.id = $2
      AND c.changed_at >= (SELECT min(valid_from) FROM page)
      AND c.changed_at <= (SELECT max(valid_from) FROM page)
    GROUP BY c.changed_at
)
SELECT p.valid_from, p.valid_to, p.deleted, p.event_id, p.event_type, p.derived,
       e.received_at, coalesce(ch.changes, '[]'::jsonb) AS changes,
       (SELECT count(*) FROM h) AS total
FROM page p
LEFT JOIN mirror.events e ON e.event_id = p.event_id
LEFT JOIN changed ch ON ch.changed_at = p.valid_from
ORDER BY p.valid_from DESC
"""
_ANOMALIES_SQL = """
SELECT a.kind, a.at, a.event_id, a.paths, a.detail, a.detected_at, a.resolved_at
FROM mirror.anomalies a
WHERE a.resource = $1 AND a.connection_id = $2 AND a.object_id = $3
ORDER BY a.at DESC, a.kind
LIMIT $4
"""


async def timeline(conn: asyncpg.Connection, resource: str, object_id: str,
                   connection_id: str | None = None, before: datetime | None = None,
                   limit: int = PAGE_DEFAULT) -> dict[str, Any] | None:
    """One page of an object's versions, newest first, each with its field changes, plus the
    object's anomalies; None when the object is unknown.

    ``before`` pages backwards: only versions valid from earlier than it. Raises AmbiguousObject
    when the id is in several connections and ``connection_id`` is None.
    """
    found_connection, _ = await history.object_as_of(conn, resource, object_id, None,
                                                      connection_id)
    if found_connection is None:
        return None
    rows = await conn.fetch(_PAGE_SQL, resource, object_id, found_connection, before,
                            limit + 1)
    if not rows:
        return None
    total = rows[0]["total"]
    more = len(rows) > limit
    rows = rows[:limit]
    anomalies = await conn.fetch(_ANOMALIES_SQL, resource, found_connection, object_id,
                                 PAGE_MAX)
    return {
        "resource": resource, "id": object_id, "connection_id": found_connection,
        "total": total, "more": more,
        "next_before": rows[-1]["valid_from"].isoformat() if more else None,
        "versions": [{
            "valid_from": r["valid_from"].isoformat(), "valid_to": _iso(r["valid_to"]),
            "deleted": r["deleted"], "derived": r["derived"], "event_id": r["event_id"],
            "event_type": r["event_type"], "received_at": _iso(r["received_at"]),
            "changes": r["changes"],
        } for r in rows],
        "anomalies": [_anomaly(a) for a in anomalies],
    }


async def state(conn: asyncpg.Connection, resource: str, object_id: str,
                at: datetime | None, known_at: datetime | None,
                connection_id: str | None = None) -> tuple[str | None, Any]:
    """(connection_id, state) of the object at ``at`` (default: its latest state) as known at
    ``known_at`` (default: everything received)."""
    return await history.object_as_of(conn, resource, object_id, at,
                                      connection_id, known_at)


_LOG_SQL = """
SELECT count(*) AS events, max(received_at) AS last_received,
       count(*) FILTER (WHERE unusable_reason IS NOT NULL) AS unprojectable,
       pg_total_relation_size('mirror.events') AS bytes
FROM mirror.events
"""
# Per minute over the hour before $1, oldest first, minutes without events included.
_RATE_SQL = """
SELECT m.minute, count(e.position) AS events
FROM generate_series(date_trunc('minute', $1::timestamptz) - interval '59 minutes',
                     date_trunc('minute', $1::timestamptz), interval '1 minute') AS m(minute)
LEFT JOIN mirror.events e
  ON e.received_at >= m.minute AND e.received_at < m.minute + interval '1 minute'
 AND e.received_at >= date_trunc('minute', $1::timestamptz) - interval '59 minutes'
GROUP BY m.minute
ORDER BY m.minute
"""
_OPEN_ANOMALIES_SQL = """
SELECT a.resource, a.connection_id, a.object_id, a.kind, a.at, a.event_id, a.paths,
       a.detected_at, count(*) OVER () AS total
FROM mirror.anomalies a
WHERE a.resolved_at IS NULL
ORDER BY a.detected_at DESC, a.at DESC
LIMIT $1
"""
_POISON_SQL = """
SELECT resource, connection_id, object_id, reason, recorded_at, count(*) OVER () AS total
FROM mirror.poison
ORDER BY recorded_at DESC
LIMIT $1
"""
_UNPROJECTABLE_SQL = """
SELECT event_id, event_type, received_at, unusable_reason AS reason
FROM mirror.events
WHERE unusable_reason IS NOT NULL
ORDER BY position DESC
LIMIT $1
"""
_BACKFILL_SQL = """
SELECT connection_id, endpoint, filters, resource, pages, objects, appended, total_count,
       started_at, updated_at, finished_at
FROM mirror.backfill_progress
ORDER BY finished_at IS NULL DESC, updated_at DESC
LIMIT $1
"""


async def overview(conn: asyncpg.Connection, now: datetime | None = None,
                   limit: int = 50) -> dict[str, Any]:
    """The overview page's figures: the log, the last hour's ingest per minute, projection
    lag, open anomalies, poisoned objects, unprojectable events and backfills."""
    now = now or datetime.now(UTC)
    log = await conn.fetchrow(_LOG_SQL)
    rate = await conn.fetch(_RATE_SQL, now)
    anomalies = await conn.fetch(_OPEN_ANOMALIES_SQL, limit)
    poison = await conn.fetch(_POISON_SQL, limit)
    unprojectable = await conn.fetch(_UNPROJECTABLE_SQL, limit)
    backfills = await conn.fetch(_BACKFILL_SQL, limit)
    return {
        "now": now.isoformat(),
        "log": {"events": log["events"], "bytes": log["bytes"],
                "last_received": _iso(log["last_received"]),
                "unprojectable": log["unprojectable"]},
        "ingest_per_minute": [{"minute": r["minute"].isoformat(), "events": r["events"]}
                              for r in rate],
        "projection_lag": await projection_lag(conn),
        "open_anomalies": {
            "total": anomalies[0]["total"] if anomalies else 0,
            "items": [{"resource": a["resource"], "connection_id": a["connection_id"],
                       "id": a["object_id"], "kind": a["kind"], "at": a["at"].isoformat(),
                       "event_id": a["event_id"], "paths": list(a["paths"]),
                       "detected_at": a["detected_at"].isoformat()} for a in anomalies],
        },
        "poisoned": {
            "total": poison[0]["total"] if poison else 0,
            "items": [{"resource": p["resource"], "connection_id": p["connection_id"],
                       "id": p["object_id"], "reason": p["reason"],
                       "recorded_at": p["recorded_at"].isoformat()} for p in poison],
        },
        "unprojectable": [{"event_id": u["event_id"], "event_type": u["event_type"],
                           "received_at": u["received_at"].isoformat(),
                           "reason": u["reason"]} for u in unprojectable],
        "backfills": [{**{k: b[k] for k in ("connection_id", "endpoint", "filters", "resource",
                                             "pages", "objects", "appended", "total_count")},
                       "started_at": b["started_at"].isoformat(),
                       "updated_at": b["updated_at"].isoformat(),
                       "finished_at": _iso(b["finished_at"])} for b in backfills],
    }


def _anomaly(row: asyncpg.Record) -> dict[str, Any]:
    return {"kind": row["kind"], "at": row["at"].isoformat(), "event_id": row["event_id"],
            "paths": list(row["paths"]), "detail": row["detail"],
            "detected_at": row["detected_at"].isoformat(),
            "resolved_at": _iso(row["resolved_at"])}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
