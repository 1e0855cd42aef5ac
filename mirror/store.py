"""The projection store: every statement that reads what the fold needs or writes what it made.

A page of events is written with a handful of set-based statements whatever its size: every
parameter is a column array expanded with ``unnest``. Intermediate current states are never
written (one upsert per object per page), a received state's data is not copied (the log holds
it: mirror.states.data stays NULL and readers join mirror.events), and a re-fold rewrites only
from its first instant onward.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from mirror.db import json_text
from mirror.fold import FOLD_KINDS, Anomaly, Candidate, Event, Folded, Prior
from projections import registry
from projections.base import Resource, parse_time

log = logging.getLogger("mirror.store")

ObjectKey = tuple[str, str, str]  # (resource, connection_id, object_id)

_KEYS = "unnest($1::text[], $2::text[], $3::text[]) AS k(resource, connection_id, object_id)"
_SAME = ("{a}.connection_id = k.connection_id AND {a}.resource = k.resource "
         "AND {a}.object_id = k.object_id")

EVENT_COLUMNS = """e.position, e.event_id, e.event_type, e.kind, e.resource, e.connection_id,
       e.object_id, e.received_at, e.origin, e.data, e.previous_attributes,
       e.integration_name, e.integration_type"""

# What a page needs to know of each touched object: the version in force just before the
# page's earliest instant for it ($4), the latest instant stored, and the object row.
TAILS_SQL = f"""
SELECT k.resource, k.connection_id, k.object_id, o.first_received, o.known_from,
       (SELECT max(s.valid_from) FROM mirror.states s WHERE {_SAME.format(a='s')}) AS last_instant,
       w.valid_from, w.valid_to, w.deleted, w.derived, w.event_id, w.position, w.state_hash,
       w.known_from AS prior_known_from,
       CASE WHEN w.deleted THEN NULL ELSE coalesce(w.data, e.data) END AS data,
       EXISTS (SELECT 1 FROM mirror.poison p WHERE {_SAME.format(a='p')}) AS poisoned
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
     AS k(resource, connection_id, object_id, since)
LEFT JOIN mirror.objects o ON {_SAME.format(a='o')}
LEFT JOIN LATERAL (
    SELECT * FROM mirror.states s
    WHERE {_SAME.format(a='s')} AND s.wins AND s.valid_from < k.since
    ORDER BY s.valid_from DESC LIMIT 1) w ON true
LEFT JOIN mirror.events e ON e.position = w.position
"""
# The stored events whose candidates lie at or after an instant: a late event re-folds from
# its own instant, so only these are read again, not the object's whole history.
LATER_EVENTS_SQL = f"""
SELECT {EVENT_COLUMNS}
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
     AS k(resource, connection_id, object_id, since)
CROSS JOIN LATERAL (
    SELECT DISTINCT s.position FROM mirror.states s
    WHERE {_SAME.format(a='s')} AND s.valid_from >= k.since) p
JOIN mirror.events e ON e.position = p.position
"""
# Every projectable event of some objects that a worker has already folded (their partition's
# checkpoint is past them): a poisoned object is folded again from its first event.
FOLDED_EVENTS_SQL = f"""
SELECT {EVENT_COLUMNS}
FROM {_KEYS}
JOIN mirror.events e
  ON e.resource = k.resource AND e.connection_id = k.connection_id
 AND e.object_id = k.object_id
WHERE e.unusable_reason IS NULL
  AND NOT EXISTS (SELECT 1 FROM mirror.unprojected_events u WHERE u.position = e.position)
"""

DELETE_STATES_SQL = f"""
DELETE FROM mirror.states s
USING unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
      AS k(resource, connection_id, object_id, since)
WHERE {_SAME.format(a='s')} AND s.valid_from >= k.since
"""
_STATE_TYPES: tuple[str, ...] = (
    "text", "text", "text", "timestamptz", "bigint", "boolean", "timestamptz", "timestamptz",
    "text", "boolean", "bytea", "bytea", "jsonb", "boolean", "timestamptz", "jsonb")
INSERT_STATES_SQL = """
INSERT INTO mirror.states (connection_id, resource, object_id, valid_from, position, derived,
                           known_from, sent_at, event_id, deleted, state_hash, prev_hash, data,
                           wins, valid_to, changes)
""" + "{rows}"
SET_VALID_TO_SQL = """
UPDATE mirror.states s SET valid_to = u.valid_to
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[],
            $6::boolean[], $7::timestamptz[])
     AS u(connection_id, resource, object_id, valid_from, position, derived, valid_to)
WHERE s.connection_id = u.connection_id AND s.resource = u.resource
  AND s.object_id = u.object_id AND s.valid_from = u.valid_from
  AND s.position = u.position AND s.derived = u.derived
"""
UPSERT_OBJECTS_SQL = """
INSERT INTO mirror.objects AS o (connection_id, resource, object_id, known_from, first_received)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
ON CONFLICT (connection_id, resource, object_id) DO UPDATE
SET known_from = least(o.known_from, EXCLUDED.known_from),
    first_received = least(o.first_received, EXCLUDED.first_received)
WHERE EXCLUDED.known_from < o.known_from OR EXCLUDED.first_received < o.first_received
"""
SET_DELETED_SQL = """
UPDATE mirror.objects o SET deleted = u.deleted
FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])
     AS u(connection_id, resource, object_id, deleted)
WHERE o.connection_id = u.connection_id AND o.resource = u.resource
  AND o.object_id = u.object_id AND o.deleted <> u.deleted
"""
UPSERT_ANOMALIES_SQL = """
INSERT INTO mirror.anomalies (connection_id, resource, object_id, kind, at, event_id, paths,
                              detail)
SELECT c, r, o, k, t, e, p::text[], d::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::text[], $7::text[], $8::text[]) AS a(c, r, o, k, t, e, p, d)
ON CONFLICT (connection_id, resource, object_id, kind, at, event_id) DO UPDATE
SET resolved_at = NULL, resolved_by = NULL, paths = EXCLUDED.paths, detail = EXCLUDED.detail
"""
# Only the kinds the fold itself finds; others (reconcile's 'drift') are not its to close.
RESOLVE_ANOMALIES_SQL = """
UPDATE mirror.anomalies a SET resolved_at = now(), resolved_by = 'later delivery'
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
     AS k(resource, connection_id, object_id, since)
WHERE a.connection_id = k.connection_id AND a.resource = k.resource
  AND a.object_id = k.object_id AND a.at >= k.since
  AND a.resolved_at IS NULL AND a.kind = ANY($5::text[])
  AND NOT EXISTS (
      SELECT 1 FROM unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::timestamptz[],
                           $11::text[]) AS n(connection_id, resource, object_id, kind, at, event_id)
      WHERE n.connection_id = a.connection_id AND n.resource = a.resource
        AND n.object_id = a.object_id AND n.kind = a.kind AND n.at = a.at
        AND n.event_id = a.event_id)
"""
UPSERT_POISON_SQL = """
INSERT INTO mirror.poison (connection_id, resource, object_id, reason, last_position)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
ON CONFLICT (connection_id, resource, object_id) DO UPDATE
SET reason = EXCLUDED.reason, last_position = EXCLUDED.last_position, recorded_at = now()
"""
CLEAR_POISON_SQL = f"""
DELETE FROM mirror.poison p USING {_KEYS} WHERE {_SAME.format(a='p')}
"""


# (connection_id, id, the version now in force, the state before the page, whether known)
_Current = tuple[str, str, "Candidate | Prior | None", "dict[str, Any] | None", bool]


@dataclass
class Tail:
    """What the fold needs of one object's stored timeline."""

    prior: Prior | None             # the version in force just before the requested instant
    prior_valid_to: datetime | None  # as stored
    last_instant: datetime | None   # the latest instant of any stored candidate
    first_received: datetime | None
    known_from: datetime | None
    poisoned: bool


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def rows_json(rows: Sequence[Sequence[Any]]) -> str:
    """Rows as one JSON array: a single parameter that PostgreSQL parses once, in C, instead
    of one array per column that the driver encodes element by element. JSON values nest as
    they are (no JSON text inside JSON), bytes travel as hex, numbers as text."""
    try:
        return orjson.dumps(rows, default=_json_default).decode()
    except TypeError:  # an integer beyond 64 bits, which orjson refuses
        return json.dumps(rows, default=_json_default, ensure_ascii=False)


def select_rows(types: Sequence[str]) -> str:
    """``SELECT`` of the columns of ``rows_json`` rows (parameter $1), typed."""
    exprs = []
    for i, t in enumerate(types):
        if t == "jsonb":
            exprs.append(f"nullif(e -> {i}, 'null'::jsonb)")
        elif t == "bytea":
            exprs.append(f"decode(e ->> {i}, 'hex')")
        elif t == "text":
            exprs.append(f"e ->> {i}")
        else:
            exprs.append(f"(e ->> {i})::{t}")
    return f"SELECT {', '.join(exprs)} FROM jsonb_array_elements($1::text::jsonb) AS e"


_INSERT_STATES = INSERT_STATES_SQL.format(rows=select_rows(_STATE_TYPES))


def columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists: the parameters of an ``unnest`` statement."""
    if not rows:
        return [[] for _ in range(width)]
    out = [list(column) for column in zip(*rows, strict=True)]
    assert len(out) == width
    return out


def _array_literal(items: Iterable[str]) -> str:
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"


def events_from_rows(rows: Iterable[asyncpg.Record]) -> dict[ObjectKey, list[Event]]:
    """Log rows as fold events, grouped by object."""
    grouped: dict[ObjectKey, list[Event]] = {}
    for row in rows:
        key = (row["resource"], row["connection_id"], row["object_id"])
        envelope = {"connection_id": row["connection_id"], "event_type": row["event_type"],
                    "integration_name": row["integration_name"],
                    "integration_type": row["integration_type"]}
        grouped.setdefault(key, []).append(Event(
            row["position"], row["event_id"], row["event_type"], row["kind"],
            row["received_at"], row["data"], row["previous_attributes"], envelope,
            row["origin"]))
    return grouped


async def load_tails(conn: asyncpg.Connection, since: dict[ObjectKey, datetime],
                     ) -> dict[ObjectKey, Tail]:
    """For each object, the version in force just before its instant in ``since``."""
    if not since:
        return {}
    keys = list(since)
    rows = await conn.fetch(TAILS_SQL, *columns(keys, 3), [since[k] for k in keys])
    out: dict[ObjectKey, Tail] = {}
    for r in rows:
        prior = None
        if r["valid_from"] is not None:
            prior = Prior(r["valid_from"], r["data"], r["state_hash"], r["deleted"],
                          r["event_id"], r["position"], r["derived"], r["prior_known_from"])
        out[(r["resource"], r["connection_id"], r["object_id"])] = Tail(
            prior, r["valid_to"], r["last_instant"], r["first_received"], r["known_from"],
            r["poisoned"])
    return out


async def load_later_events(conn: asyncpg.Connection, since: dict[ObjectKey, datetime],
                            ) -> dict[ObjectKey, list[Event]]:
    """The stored events with a candidate at or after each object's instant."""
    keys = list(since)
    rows = await conn.fetch(LATER_EVENTS_SQL, *columns(keys, 3), [since[k] for k in keys])
    return events_from_rows(rows)


async def load_folded_events(conn: asyncpg.Connection, keys: Sequence[ObjectKey],
                             ) -> dict[ObjectKey, list[Event]]:
    """Every projectable event of these objects that their partition has already passed."""
    return events_from_rows(await conn.fetch(FOLDED_EVENTS_SQL, *columns(keys, 3)))


@dataclass
class Outcome:
    """One object's fold from ``since`` on, ready to write."""

    key: ObjectKey
    since: datetime
    refold: bool                      # stored candidates at or after ``since`` are replaced
    tail: Tail | None
    folded: Folded
    event_anomalies: list[Anomaly]    # anomalies single events show (clock skew, ...)
    before: dict[str, Any] | None     # the current state before this page (None: none)
    before_known: bool = True         # False: rewrite the child rows whatever they were


class Writer:
    """Collects a page's outcomes and writes them in a few set-based statements."""

    def __init__(self) -> None:
        self.refolds: list[tuple[str, str, str, datetime]] = []
        self.states: list[tuple[Any, ...]] = []
        self.valid_to: list[tuple[Any, ...]] = []
        self.objects: list[tuple[Any, ...]] = []
        self.anomalies: list[tuple[Any, ...]] = []
        self.cleared: list[ObjectKey] = []
        self.deleted: list[tuple[str, str, str, bool]] = []
        self.poison: list[tuple[Any, ...]] = []
        self.current: dict[str, list[_Current]] = {}

    def add(self, out: Outcome) -> None:
        resource, conn_id, obj_id = out.key
        folded = out.folded
        if out.refold:
            self.refolds.append((resource, conn_id, obj_id, out.since))
        for c in folded.candidates:
            self.states.append((
                conn_id, resource, obj_id, c.valid_from, c.position, c.derived, c.known_from,
                c.sent_at, c.event_id, c.deleted, c.state_hash, c.prev_hash,
                c.data if c.stored and not c.deleted else None, c.wins,
                c.valid_to, c.changes if c.wins and c.changes else None))
        prior = out.tail.prior if out.tail else None
        if prior is not None and out.tail is not None and \
                folded.prior_valid_to != out.tail.prior_valid_to:
            self.valid_to.append((conn_id, resource, obj_id, prior.valid_from, prior.position,
                                  prior.derived, folded.prior_valid_to))
        received = [c.valid_from for c in folded.candidates if not c.derived]
        known = [c.known_from for c in folded.candidates]
        if known:
            first = min(received) if received else min(c.valid_from for c in folded.candidates)
            tail = out.tail
            # Written when the object is new or either time moves earlier, not every page.
            if tail is None or tail.known_from is None or tail.first_received is None \
                    or min(known) < tail.known_from or first < tail.first_received:
                self.objects.append((conn_id, resource, obj_id, min(known), first))
        for a in (*out.event_anomalies, *folded.anomalies):
            self.anomalies.append((conn_id, resource, obj_id, a.kind, a.at, a.event_id,
                                   _array_literal(a.paths), json_text(a.detail)))
        if out.tail is not None and out.tail.poisoned:
            self.cleared.append(out.key)
        now_deleted = folded.current is not None and folded.current.deleted
        was_deleted = prior is not None and prior.deleted
        if now_deleted != was_deleted or (out.refold and now_deleted):
            self.deleted.append((conn_id, resource, obj_id, now_deleted))
        if folded.current is not prior:
            self.current.setdefault(resource, []).append(
                (conn_id, obj_id, folded.current, out.before, out.before_known))

    def poisoned(self, key: ObjectKey, reason: str, position: int) -> None:
        self.poison.append((key[1], key[0], key[2], reason[:1000], position))

    async def write(self, conn: asyncpg.Connection) -> None:
        """Every statement of the page, in the caller's transaction."""
        if self.refolds:
            params = columns(self.refolds, 4)
            await conn.execute(DELETE_STATES_SQL, *params)
        if self.states:
            await conn.execute(_INSERT_STATES, rows_json(self.states))
        if self.valid_to:
            await conn.execute(SET_VALID_TO_SQL, *columns(self.valid_to, 7))
        if self.objects:
            await conn.execute(UPSERT_OBJECTS_SQL, *columns(self.objects, 5))
        anomalies = list({a[:6]: a for a in self.anomalies}.values())
        if anomalies:
            await conn.execute(UPSERT_ANOMALIES_SQL, *columns(anomalies, 8))
        if self.refolds:
            # Only a re-fold knows every anomaly from its instant on: what it no longer finds
            # was explained by a later delivery.
            found = columns([a[:6] for a in anomalies], 6)
            await conn.execute(RESOLVE_ANOMALIES_SQL, *columns(self.refolds, 4),
                               list(FOLD_KINDS), *found)
        if self.deleted:
            await conn.execute(SET_DELETED_SQL, *columns(self.deleted, 4))
        if self.cleared:
            await conn.execute(CLEAR_POISON_SQL, *columns(self.cleared, 3))
        if self.poison:
            await conn.execute(UPSERT_POISON_SQL, *columns(self.poison, 5))
        for name, items in self.current.items():
            resource = registry.by_name(name)
            if resource is not None:
                await _write_current(conn, resource, items)


async def _write_current(conn: asyncpg.Connection, resource: Resource,
                         items: list[_Current]) -> None:
    sql = statements(resource)
    live: list[tuple[Any, ...]] = []
    gone: list[tuple[str, str]] = []
    stale: list[list[tuple[str, str]]] = [[] for _ in resource.children]
    children: list[list[tuple[Any, ...]]] = [[] for _ in resource.children]
    for conn_id, obj_id, current, before, known in items:
        data = None if current is None or current.deleted else current.data
        if data is None:
            gone.append((conn_id, obj_id))
        else:
            assert current is not None
            live.append((conn_id, obj_id, data, parse_time(data.get("created_date")),
                         parse_time(data.get("updated_date")), current.valid_from,
                         current.event_id, *[c.extract(data) for c in resource.columns]))
        for index, child in enumerate(resource.children):
            old = before.get(child.array) if before else None
            new = data.get(child.array) if data else None
            if known and old == new and _same_json(old, new):
                continue  # the child rows stand as they are: nothing to rewrite
            if not known or (isinstance(old, list) and old):
                stale[index].append((conn_id, obj_id))
            if isinstance(new, list):
                for line, element in enumerate(new):
                    if isinstance(element, dict):
                        children[index].append((conn_id, obj_id, line, element,
                                                *[c.extract(element) for c in child.columns]))
    for index, delete in enumerate(sql.child_delete):
        if stale[index] or gone:
            await conn.execute(delete, *columns(stale[index] + gone, 2))
    if gone:
        await conn.execute(sql.delete, *columns(gone, 2))
    if live:
        await conn.execute(sql.upsert, rows_json(live))
    for index in range(len(resource.children)):
        if children[index]:
            await conn.execute(sql.child_insert[index], rows_json(children[index]))


def _same_json(a: Any, b: Any) -> bool:
    return orjson.dumps(a) == orjson.dumps(b)


@dataclass(frozen=True)
class _Statements:
    """The SQL of one resource's current-state relation and children, built once from the
    registry (identifiers checked there), never from a request."""

    upsert: str
    delete: str
    child_delete: tuple[str, ...]
    child_insert: tuple[str, ...]


def _statements(resource: Resource) -> _Statements:
    cols = ["connection_id", "id", "data", "created_date", "updated_date", "valid_from",
            "event_id", *[c.name for c in resource.columns]]
    types = ["text", "text", "jsonb", "timestamptz", "timestamptz", "timestamptz", "text",
             *[c.sql_type for c in resource.columns]]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:])
    upsert = (f"INSERT INTO mirror.{resource.table} ({', '.join(cols)}) {select_rows(types)} "
              f"ON CONFLICT (connection_id, id) DO UPDATE SET {updates}")
    delete = (f"DELETE FROM mirror.{resource.table} t USING unnest($1::text[], $2::text[]) "
              "AS k(connection_id, id) WHERE t.connection_id = k.connection_id AND t.id = k.id")
    child_delete = []
    child_insert = []
    for child in resource.children:
        child_delete.append(
            f"DELETE FROM mirror.{child.table} t USING unnest($1::text[], $2::text[]) "
            f"AS k(connection_id, id) WHERE t.connection_id = k.connection_id "
            f"AND t.{child.parent_column} = k.id")
        ccols = ["connection_id", child.parent_column, "line_number", "data",
                 *[c.name for c in child.columns]]
        ctypes = ["text", "text", "integer", "jsonb", *[c.sql_type for c in child.columns]]
        child_insert.append(f"INSERT INTO mirror.{child.table} ({', '.join(ccols)}) "
                            f"{select_rows(ctypes)}")
    return _Statements(upsert, delete, tuple(child_delete), tuple(child_insert))


_STATEMENTS: dict[str, _Statements] = {}


def statements(resource: Resource) -> _Statements:
    """The cached SQL for one resource."""
    found = _STATEMENTS.get(resource.name)
    if found is None:
        found = _STATEMENTS[resource.name] = _statements(resource)
    return found
