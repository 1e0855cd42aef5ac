"""Projection workers: fold the log into current state, versions, changes and anomalies.

Reading the log without skipping late commits
---------------------------------------------
Positions come from a sequence at INSERT time, so a transaction that took position 5 may
commit after one that took position 6 is already visible. A reader that remembers "done up
to 6" would skip 5 forever. Each row therefore also records its writer's transaction id
(``txid``), and a reader only takes rows whose txid is below the xmin of its own snapshot:
every transaction below xmin has finished, so no row with such a txid can still appear.
Rows are consumed in (txid, position) order and the checkpoint is that pair; any row that
commits later belongs to a transaction at or above today's xmin, hence sorts after the
checkpoint, and is read then. A long transaction elsewhere holds xmin back: it delays
projection, it never loses an event.

Sharing the work
----------------
Events are spread over 16 partitions by a hash of the object key (a generated column), so
one object's events stay in one partition and are folded in order. A worker takes a
partition for one batch with a transaction-scoped advisory lock, reads the partition's
checkpoint FOR UPDATE, folds, writes, and moves the checkpoint with a guard on its previous
value, all in one transaction: two workers (or processes) can never both apply a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from mirror.db import is_unavailable, json_text
from mirror.fold import Event, History, Version, fold, fold_append
from mirror.metrics import Metrics
from projections import registry
from projections.base import Column, Resource, parse_time

log = logging.getLogger("mirror.projector")

PARTITIONS = 16
_LOCK_CLASS = 7_205_002  # advisory lock namespace of the partitions

FETCH_SQL = """
SELECT position, txid, resource, connection_id, object_id, unusable_reason, event_id,
       event_type, kind, received_at, data, previous_attributes, integration_name,
       integration_type
FROM mirror.events
WHERE part = $1
  AND (txid, position) > ($2::xid8, $3::bigint)
  AND txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY txid, position
LIMIT $4
"""

LOAD_SQL = """
SELECT e.position, e.event_id, e.event_type, e.kind, e.resource, e.connection_id, e.object_id,
       e.received_at, e.data, e.previous_attributes, e.integration_name, e.integration_type
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(resource, connection_id, object_id)
JOIN mirror.events e
  ON e.resource = k.resource AND e.connection_id = k.connection_id AND e.object_id = k.object_id
WHERE e.unusable_reason IS NULL
"""

_OBJECTS = "unnest($1::text[], $2::text[], $3::text[]) AS k(resource, connection_id, object_id)"

DELETE_VERSIONS_SQL = f"""
DELETE FROM mirror.versions v USING {_OBJECTS}
WHERE v.resource = k.resource AND v.object_id = k.object_id AND v.connection_id = k.connection_id
"""
DELETE_CHANGES_SQL = f"""
DELETE FROM mirror.changes c USING {_OBJECTS}
WHERE c.resource = k.resource AND c.id = k.object_id AND c.connection_id = k.connection_id
"""
INSERT_VERSIONS_SQL = """
INSERT INTO mirror.versions (resource, connection_id, object_id, seq, valid_from, valid_to, data,
                             event_id, event_type, derived, known_from, position)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[],
                     $6::timestamptz[], $7::jsonb[], $8::text[], $9::text[], $10::boolean[],
                     $11::timestamptz[], $12::bigint[])
"""
INSERT_CHANGES_SQL = """
INSERT INTO mirror.changes (resource, connection_id, id, seq, changed_at, path, old_value,
                            new_value, event_id, derived)
SELECT r, c, i, s, t, p, o::jsonb, n::jsonb, e, d
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::text[],
            $7::text[], $8::text[], $9::text[], $10::boolean[]) AS u(r, c, i, s, t, p, o, n, e, d)
"""
UPSERT_OBJECTS_SQL = """
INSERT INTO mirror.objects (resource, object_id, connection_id, versions, deleted, first_valid,
                            last_valid)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::boolean[],
                     $6::timestamptz[], $7::timestamptz[])
ON CONFLICT (resource, object_id, connection_id) DO UPDATE
SET versions = EXCLUDED.versions, deleted = EXCLUDED.deleted,
    first_valid = coalesce(EXCLUDED.first_valid, mirror.objects.first_valid),
    last_valid = EXCLUDED.last_valid
"""
CLOSE_TAIL_SQL = """
UPDATE mirror.versions v SET valid_to = u.valid_to
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[])
     AS u(resource, connection_id, object_id, seq, valid_to)
WHERE v.resource = u.resource AND v.object_id = u.object_id
  AND v.connection_id = u.connection_id AND v.seq = u.seq
"""
TAILS_SQL = f"""
SELECT k.resource, k.connection_id, k.object_id, t.seq, t.valid_from, t.valid_to, t.data,
       t.event_id, t.event_type, t.derived, t.known_from, t.position,
       EXISTS (SELECT 1 FROM mirror.poison p WHERE p.resource = k.resource
               AND p.object_id = k.object_id AND p.connection_id = k.connection_id) AS poisoned
FROM {_OBJECTS}
LEFT JOIN LATERAL (
    SELECT * FROM mirror.versions v
    WHERE v.resource = k.resource AND v.object_id = k.object_id
      AND v.connection_id = k.connection_id
    ORDER BY v.seq DESC LIMIT 1) t ON true
"""
# The events of some objects up to the end of the current batch: a full re-fold must not
# take in events that later batches will bring, or every later batch would find them
# already folded and re-fold again.
LOAD_UPTO_SQL = LOAD_SQL + "  AND (e.txid, e.position) <= ($4::xid8, $5::bigint)\n"
UPSERT_ANOMALIES_SQL = """
INSERT INTO mirror.anomalies (resource, connection_id, object_id, kind, at, event_id, paths,
                              detail)
SELECT r, c, o, k, t, e, p::text[], d
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::text[], $7::text[], $8::jsonb[]) AS a(r, c, o, k, t, e, p, d)
ON CONFLICT (resource, object_id, connection_id, kind, at, event_id) DO UPDATE
SET resolved_at = NULL, resolved_by = NULL, paths = EXCLUDED.paths, detail = EXCLUDED.detail
"""
RESOLVE_ANOMALIES_SQL = f"""
UPDATE mirror.anomalies a SET resolved_at = now(), resolved_by = 'later delivery'
FROM {_OBJECTS}
WHERE a.resource = k.resource AND a.object_id = k.object_id AND a.connection_id = k.connection_id
  AND a.resolved_at IS NULL
  -- only the kinds the fold itself finds; others (reconcile's 'drift') are not its to close
  AND a.kind IN ('missed_webhook', 'inconsistent', 'conflict', 'unplaceable')
  AND NOT EXISTS (
      SELECT 1 FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[],
                           $9::text[]) AS n(resource, connection_id, object_id, kind, at, event_id)
      WHERE n.resource = a.resource AND n.object_id = a.object_id
        AND n.connection_id = a.connection_id AND n.kind = a.kind AND n.at = a.at
        AND n.event_id = a.event_id)
"""
UPSERT_POISON_SQL = """
INSERT INTO mirror.poison (resource, connection_id, object_id, reason, last_position)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
ON CONFLICT (resource, object_id, connection_id) DO UPDATE
SET reason = EXCLUDED.reason, last_position = EXCLUDED.last_position, recorded_at = now()
"""
CLEAR_POISON_SQL = f"""
DELETE FROM mirror.poison p USING {_OBJECTS}
WHERE p.resource = k.resource AND p.object_id = k.object_id AND p.connection_id = k.connection_id
"""

LAG_SQL = """
SELECT c.part, count(e.position) AS pending, min(e.received_at) AS oldest
FROM mirror.checkpoints c
LEFT JOIN mirror.events e
  ON e.part = c.part AND (e.txid, e.position) > (c.last_txid, c.last_position)
GROUP BY c.part
"""
# Only transactions holding an xid (running or prepared) hold pg_snapshot_xmin back, and so
# projection; a read-only snapshot (pg_dump, REPEATABLE READ readers) does not.
HORIZON_SQL = """
SELECT coalesce(extract(epoch FROM now() - least(
    (SELECT min(xact_start) FROM pg_stat_activity WHERE backend_xid IS NOT NULL),
    (SELECT min(prepared) FROM pg_prepared_xacts))), 0)::float8
"""

# Each worker says it is alive this often; /readyz counts workers seen within WORKERS_FRESH.
BEAT_SECONDS = 2.0
WORKERS_FRESH = "15 seconds"
BEAT_SQL = """
INSERT INTO mirror.workers (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET beat_at = now()
"""
LIVE_WORKERS_SQL = f"""
SELECT count(*) FROM mirror.workers WHERE beat_at > now() - interval '{WORKERS_FRESH}'
"""

ObjectKey = tuple[str, str, str]


@dataclass(frozen=True)
class _Statements:
    """The SQL of one resource's current-state relation and children, built once from the
    registry (identifiers checked there), never from a request."""

    upsert: str
    delete: str
    child_delete: tuple[str, ...]
    child_insert: tuple[str, ...]


def _unnest(types: Sequence[str]) -> str:
    """``SELECT ... FROM unnest(...)`` over typed array parameters; jsonb travels as text."""
    params = ", ".join(f"${i}::{'text' if t == 'jsonb' else t}[]"
                       for i, t in enumerate(types, start=1))
    names = [f"c{i}" for i in range(len(types))]
    select = ", ".join(f"{n}::jsonb" if t == "jsonb" else n for n, t in zip(names, types,
                                                                            strict=True))
    return f"SELECT {select} FROM unnest({params}) AS u({', '.join(names)})"


def _statements(resource: Resource) -> _Statements:
    cols = ["connection_id", "id", "data", "created_date", "updated_date", "version_seq",
            "event_id", *[c.name for c in resource.columns]]
    types = ["text", "text", "jsonb", "timestamptz", "timestamptz", "int", "text",
             *[c.sql_type for c in resource.columns]]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:])
    upsert = (f"INSERT INTO mirror.{resource.table} ({', '.join(cols)}) {_unnest(types)} "
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
        ctypes = ["text", "text", "int", "jsonb", *[c.sql_type for c in child.columns]]
        child_insert.append(f"INSERT INTO mirror.{child.table} ({', '.join(ccols)}) "
                            f"{_unnest(ctypes)}")
    return _Statements(upsert, delete, tuple(child_delete), tuple(child_insert))


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    out: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(out, row, strict=True):
            column.append(value)
    return out


def _array_literal(items: Sequence[str]) -> str:
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"


def _objects_params(keys: Iterable[ObjectKey]) -> list[list[str]]:
    return _columns(list(keys), 3)


def events_from_rows(rows: Iterable[asyncpg.Record]) -> dict[ObjectKey, list[Event]]:
    """Group log rows by object."""
    grouped: dict[ObjectKey, list[Event]] = {}
    for row in rows:
        key = (row["resource"], row["connection_id"], row["object_id"])
        envelope = {"connection_id": row["connection_id"], "event_type": row["event_type"],
                    "integration_name": row["integration_name"],
                    "integration_type": row["integration_type"]}
        grouped.setdefault(key, []).append(Event(
            row["position"], row["event_id"], row["event_type"], row["kind"],
            row["received_at"], row["data"], row["previous_attributes"], envelope))
    return grouped


async def write_histories(conn: asyncpg.Connection, histories: dict[ObjectKey, History],
                          poisoned: dict[ObjectKey, tuple[str, int]]) -> None:
    """Store each object's history and current state: a full history replaces what was
    stored; a partial one (fold_append) closes the stored tail and appends after it."""
    keys = list(histories)
    if keys:
        full = [k for k, h in histories.items() if not h.partial]
        params = _objects_params(full)
        if full:
            await conn.execute(DELETE_VERSIONS_SQL, *params)
            await conn.execute(DELETE_CHANGES_SQL, *params)
        versions: list[tuple[Any, ...]] = []
        closed: list[tuple[Any, ...]] = []
        changes: list[tuple[Any, ...]] = []
        objects: list[tuple[Any, ...]] = []
        anomalies: list[tuple[Any, ...]] = []
        for (resource, conn_id, obj_id), history in histories.items():
            stored = history.versions
            if history.partial:
                tail, stored = stored[0], stored[1:]
                closed.append((resource, conn_id, obj_id, tail.seq, tail.valid_to))
            for v in stored:
                versions.append((resource, conn_id, obj_id, v.seq, v.valid_from, v.valid_to,
                                 v.data, v.event_id, v.event_type, v.derived, v.known_from,
                                 v.position))
            for c in history.changes:
                # Values may be arrays: they travel as JSON text, since asyncpg would read a
                # Python list inside a jsonb[] parameter as another array dimension.
                changes.append((resource, conn_id, obj_id, c.seq, c.changed_at, c.path,
                                json_text(c.old_value), json_text(c.new_value), c.event_id,
                                c.derived))
            current = history.current
            first = history.versions[0].valid_from if history.versions else None
            objects.append((resource, obj_id, conn_id, current.seq + 1 if current else 0,
                            current is None or current.data is None,
                            None if history.partial else first,
                            current.valid_from if current else None))
            for a in history.anomalies:
                anomalies.append((resource, conn_id, obj_id, a.kind, a.at, a.event_id,
                                  list(a.paths), a.detail))
        if closed:
            await conn.execute(CLOSE_TAIL_SQL, *_columns(closed, 5))
        if versions:
            await conn.execute(INSERT_VERSIONS_SQL, *_columns(versions, 12))
        if changes:
            await conn.execute(INSERT_CHANGES_SQL, *_columns(changes, 10))
        await conn.execute(UPSERT_OBJECTS_SQL, *_columns(objects, 7))
        anomalies = list({a[:6]: a for a in anomalies}.values())
        if anomalies:
            # Each row's paths travel as one text[] literal, cast back in the statement.
            rows = [(*a[:6], _array_literal(a[6]), a[7]) for a in anomalies]
            await conn.execute(UPSERT_ANOMALIES_SQL, *_columns(rows, 8))
        if full:
            # Only a full fold knows every anomaly of an object; what it no longer finds was
            # explained by a later delivery.
            refolded = set(full)
            found = _columns([a[:6] for a in anomalies if (a[0], a[1], a[2]) in refolded], 6)
            await conn.execute(RESOLVE_ANOMALIES_SQL, *params, *found)
            await conn.execute(CLEAR_POISON_SQL, *params)
        await _write_current(conn, histories)
    if poisoned:
        rows = [(*key, reason, position) for key, (reason, position) in poisoned.items()]
        await conn.execute(UPSERT_POISON_SQL, *_columns(rows, 5))


async def write_guarded(conn: asyncpg.Connection, histories: dict[ObjectKey, History],
                        poisoned: dict[ObjectKey, tuple[str, int]],
                        last_position: dict[ObjectKey, int]) -> None:
    """write_histories, but an object the database refuses becomes poison instead of
    failing (and so stalling) its whole partition."""
    try:
        async with conn.transaction():  # a savepoint inside the batch transaction
            await write_histories(conn, histories, poisoned)
        return
    except asyncpg.PostgresError as exc:
        if is_unavailable(exc):
            raise
        log.warning("batch write refused, writing object by object",
                    extra={"sqlstate": exc.sqlstate})
    for key, history in histories.items():
        try:
            async with conn.transaction():
                await write_histories(conn, {key: history}, {})
        except asyncpg.PostgresError as exc:
            if is_unavailable(exc):
                raise
            poisoned[key] = (f"database refused the fold: {exc.sqlstate} {exc}"[:1000],
                             last_position.get(key, 0))
    if poisoned:
        await write_histories(conn, {}, poisoned)


async def _write_current(conn: asyncpg.Connection, histories: dict[ObjectKey, History]) -> None:
    by_resource: dict[str, list[tuple[str, str, History]]] = {}
    for (resource_name, conn_id, obj_id), history in histories.items():
        by_resource.setdefault(resource_name, []).append((conn_id, obj_id, history))
    for name, items in by_resource.items():
        found = registry.by_name(name)
        if found is None:
            continue
        resource = found
        sql = statements(resource)
        live: list[tuple[Any, ...]] = []
        gone: list[tuple[str, str]] = []
        children: list[list[tuple[Any, ...]]] = [[] for _ in resource.children]
        for conn_id, obj_id, history in items:
            current = history.current
            if current is None or current.data is None:
                gone.append((conn_id, obj_id))
                continue
            data = current.data
            live.append((conn_id, obj_id, json_text(data), parse_time(data.get("created_date")),
                         parse_time(data.get("updated_date")), current.seq, current.event_id,
                         *[_param(c, data) for c in resource.columns]))
            for index, child in enumerate(resource.children):
                elements = data.get(child.array)
                if not isinstance(elements, list):
                    continue
                for line, element in enumerate(elements):
                    if isinstance(element, dict):
                        children[index].append((conn_id, obj_id, line, json_text(element),
                                                *[_param(c, element) for c in child.columns]))
        every = _columns([(c, o) for c, o, _ in items], 2)
        for delete in sql.child_delete:
            await conn.execute(delete, *every)
        if gone:
            await conn.execute(sql.delete, *_columns(gone, 2))
        if live:
            await conn.execute(sql.upsert, *_columns(live, 7 + len(resource.columns)))
        for index, child in enumerate(resource.children):
            if children[index]:
                await conn.execute(sql.child_insert[index],
                                   *_columns(children[index], 4 + len(child.columns)))


def _param(column: Column, obj: dict[str, Any]) -> Any:
    value = column.extract(obj)
    return json_text(value) if column.sql_type == "jsonb" else value


_STATEMENTS: dict[str, _Statements] = {}


def statements(resource: Resource) -> _Statements:
    """The cached SQL for one resource."""
    found = _STATEMENTS.get(resource.name)
    if found is None:
        found = _STATEMENTS[resource.name] = _statements(resource)
    return found


def fold_objects(grouped: dict[ObjectKey, list[Event]], last_position: dict[ObjectKey, int],
                 ) -> tuple[dict[ObjectKey, History], dict[ObjectKey, tuple[str, int]]]:
    """Fold each object; an object whose fold raises is set aside as poison, not the batch."""
    histories: dict[ObjectKey, History] = {}
    poisoned: dict[ObjectKey, tuple[str, int]] = {}
    for key, events in grouped.items():
        resource = registry.by_name(key[0])
        if resource is None:
            continue
        try:
            histories[key] = fold(resource, events)
        except Exception as exc:
            log.error("fold failed", extra={"resource": key[0], "object_id": key[2],
                                            "error": repr(exc)[:500]})
            poisoned[key] = (f"{type(exc).__name__}: {exc}"[:1000], last_position.get(key, 0))
    return histories, poisoned


class Projector:
    """The projection workers of one process. ``start``, ``stop`` (safe twice), ``caught_up``."""

    def __init__(self, pool: asyncpg.Pool, url: str, *, workers: int = 2,
                 batch_size: int = 500, poll_interval: float = 1.0,
                 metrics: Metrics | None = None) -> None:
        self._pool = pool
        self._url = url
        self._workers = workers
        self._batch_size = batch_size
        self._poll = poll_interval
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="projector-listen")]
        self._tasks += [asyncio.create_task(self._work(i), name=f"projector-{i}")
                        for i in range(self._workers)]

    async def stop(self) -> None:
        """Let each worker finish (commit) its batch, then end. Safe to call twice."""
        self._stopping.set()
        self._wake.set()
        for task in self._tasks:
            if task.get_name() == "projector-listen":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _listen(self) -> None:
        # NOTIFY wakes, polling decides: a lost notification only costs latency.
        while not self._stopping.is_set():
            try:
                conn = await asyncpg.connect(self._url, timeout=5)
            except Exception:
                await asyncio.sleep(self._poll)
                continue
            try:
                await conn.add_listener("mirror_events", lambda *_: self._wake.set())
                while not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._poll)
                    if self._stopping.is_set():
                        break
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _beat(self, name: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(BEAT_SQL, name)

    async def _work(self, index: int) -> None:
        name = f"{socket.gethostname()}:{os.getpid()}:{index}"
        last_beat = 0.0
        failures = 0
        order = list(range(PARTITIONS))
        # Start each worker at a different partition so they rarely collide on a lock.
        order = order[index * PARTITIONS // self._workers:] + \
            order[: index * PARTITIONS // self._workers]
        while not self._stopping.is_set():
            self._wake.clear()
            done = 0
            try:
                now = time.monotonic()
                if now - last_beat >= BEAT_SECONDS:
                    await self._beat(name)
                    last_beat = now
                for part in order:
                    if self._stopping.is_set():
                        break
                    done += await self.run_partition(part)
            except Exception as exc:
                level = logging.WARNING if is_unavailable(exc) else logging.ERROR
                log.log(level, "projection batch failed", extra={"error": repr(exc)[:500]})
                # Retry soon, then less often: a database back from an outage is picked up
                # within a fraction of a second, a long outage is not hammered.
                failures += 1
                await asyncio.sleep(min(self._poll, 0.1 * 2 ** min(failures, 6)))
                continue
            failures = 0
            if done == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)

    async def run_partition(self, part: int) -> int:
        """Fold one batch of one partition; return how many log rows it consumed."""
        async with self._pool.acquire() as conn, conn.transaction():
            return await project_batch(conn, part, self._batch_size, self._metrics)

    async def caught_up(self, timeout: float = 30.0) -> None:
        """Return once every event committed before the call has been projected."""
        async with self._pool.acquire() as conn:
            target = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with self._pool.acquire() as conn:
                behind = await conn.fetchval(
                    "SELECT count(*) FROM mirror.checkpoints c WHERE EXISTS ("
                    " SELECT 1 FROM mirror.events e WHERE e.part = c.part"
                    " AND (e.txid, e.position) > (c.last_txid, c.last_position)"
                    " AND e.txid < $1::xid8)", target)
            if behind == 0:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"projection not caught up: {behind} partitions behind")
            self._wake.set()
            await asyncio.sleep(0.02)



async def projection_lag(conn: asyncpg.Connection) -> dict[str, Any]:
    """Events not yet projected and the age of the oldest one."""
    rows = await conn.fetch(LAG_SQL)
    pending = sum(r["pending"] for r in rows)
    oldest = min((r["oldest"] for r in rows if r["oldest"] is not None), default=None)
    age = await conn.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)::float8",
                              oldest) if oldest else 0.0
    return {"events": pending, "seconds": round(age or 0.0, 3)}


async def refresh_gauges(conn: asyncpg.Connection, metrics: Metrics) -> None:
    """Set the log/projection gauges from the database."""
    for row in await conn.fetch(LAG_SQL):
        metrics.lag_events.labels(str(row["part"])).set(row["pending"])
    oldest = await conn.fetchval(
        "SELECT coalesce(extract(epoch FROM now() - min(e.received_at)), 0)::float8 "
        "FROM mirror.checkpoints c JOIN mirror.events e ON e.part = c.part "
        "AND (e.txid, e.position) > (c.last_txid, c.last_position)")
    metrics.lag_seconds.set(oldest or 0.0)
    metrics.horizon_seconds.set(await conn.fetchval(HORIZON_SQL) or 0.0)
    metrics.log_head.set(await conn.fetchval(
        "SELECT coalesce(max(position), 0) FROM mirror.events"))
    metrics.anomalies.set(await conn.fetchval(
        "SELECT count(*) FROM mirror.anomalies WHERE resolved_at IS NULL"))
    metrics.unprojectable.set(await conn.fetchval(
        "SELECT count(*) FROM mirror.events WHERE unusable_reason IS NOT NULL"))
    metrics.poisoned.set(await conn.fetchval("SELECT count(*) FROM mirror.poison"))


async def _append_where_possible(conn: asyncpg.Connection,
                                 fresh: dict[ObjectKey, list[Event]],
                                 ) -> tuple[dict[ObjectKey, History], list[ObjectKey]]:
    """Fold each object's new events onto its stored last version when they all come after
    it (the common case: the cost does not grow with the object's history). Returns those
    histories and the objects that need a full re-fold from the log instead."""
    tails = {(r["resource"], r["connection_id"], r["object_id"]): r
             for r in await conn.fetch(TAILS_SQL, *_objects_params(fresh))}
    histories: dict[ObjectKey, History] = {}
    slow: list[ObjectKey] = []
    for key, events in fresh.items():
        row = tails[key]
        resource = registry.by_name(key[0])
        if row["poisoned"] or resource is None:
            slow.append(key)
            continue
        if row["seq"] is None:
            # No stored version and not poisoned: every projectable event of this object so
            # far is in this batch, so folding them is the full fold.
            try:
                histories[key] = fold(resource, events)
            except Exception:
                slow.append(key)
            continue
        tail = Version(row["seq"], row["valid_from"], row["valid_to"], row["data"],
                       row["event_id"], row["event_type"], row["derived"], row["known_from"],
                       row["position"])
        try:
            history = fold_append(resource, tail, events)
        except Exception:
            history = None  # the full fold below records the reason if it fails too
        if history is None:
            slow.append(key)
        else:
            histories[key] = history
    return histories, slow


async def project_batch(conn: asyncpg.Connection, part: int, batch_size: int,
                        metrics: Metrics | None = None) -> int:
    """One guarded batch inside the caller's transaction. Returns rows consumed (0: idle or
    the partition is held by another worker)."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, $2)", _LOCK_CLASS, part):
        return 0
    checkpoint = await conn.fetchrow(
        "SELECT last_txid AS txid, last_position FROM mirror.checkpoints "
        "WHERE part = $1 FOR UPDATE", part)
    rows = await conn.fetch(FETCH_SQL, part, checkpoint["txid"], checkpoint["last_position"],
                            batch_size)
    if not rows:
        return 0
    keys: dict[ObjectKey, int] = {}
    for row in rows:
        if row["unusable_reason"] is None and row["resource"] is not None:
            keys[(row["resource"], row["connection_id"], row["object_id"])] = row["position"]
    if keys:
        fresh = events_from_rows(r for r in rows if r["unusable_reason"] is None
                                 and r["resource"] is not None)
        histories, slow = await _append_where_possible(conn, fresh)
        poisoned: dict[ObjectKey, tuple[str, int]] = {}
        if slow:
            last = rows[-1]
            loaded = await conn.fetch(LOAD_UPTO_SQL, *_objects_params(slow), last["txid"],
                                      last["position"])
            refolded, poisoned = fold_objects(events_from_rows(loaded), keys)
            histories.update(refolded)
        await write_guarded(conn, histories, poisoned, keys)
    last = rows[-1]
    moved = await conn.execute(
        "UPDATE mirror.checkpoints SET last_txid = $2::xid8, last_position = $3, "
        "updated_at = now() WHERE part = $1 AND last_txid = $4::xid8 AND last_position = $5",
        part, last["txid"], last["position"], checkpoint["txid"], checkpoint["last_position"])
    if moved != "UPDATE 1":
        raise RuntimeError(f"checkpoint of partition {part} moved under us")
    if metrics is not None:
        metrics.projected.inc(len(rows))
    return len(rows)
