"""The event log: appends with group commit, so concurrent requests share one INSERT and one
commit, and each request is answered only after the batch holding its event has committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from mirror.db import is_unavailable
from mirror.errors import DatabaseUnavailable
from mirror.parsing import Parsed

log = logging.getLogger("mirror.eventlog")

_COLUMNS = (
    "event_id", "received_at", "svix_timestamp", "origin", "connection_id", "integration_name",
    "integration_type", "event_type", "kind", "resource", "object_id", "data",
    "previous_attributes", "body", "body_sha256", "redacted", "unusable_reason",
)
_TYPES = (
    "text", "timestamptz", "timestamptz", "text", "text", "text", "text", "text", "text", "text",
    "text", "jsonb", "jsonb", "bytea", "bytea", "boolean", "text",
)
# JSON columns travel as text (already checked to be storable by mirror.parsing) and are cast
# in the database, so no Python value is serialised twice.
APPEND_SQL = (
    f"INSERT INTO mirror.events ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join(f'c{i}::jsonb' if t == 'jsonb' else f'c{i}' for i, t in enumerate(_TYPES))}"
    " FROM unnest("
    + ", ".join(f"${i + 1}::{'text' if t == 'jsonb' else t}[]" for i, t in enumerate(_TYPES))
    + f") AS u({', '.join(f'c{i}' for i in range(len(_TYPES)))})"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)


@dataclass(frozen=True)
class Record:
    """One row to append."""

    event_id: str
    received_at: datetime
    svix_timestamp: datetime | None
    origin: str
    parsed: Parsed

    def values(self) -> tuple[Any, ...]:
        e = self.parsed
        # '' for a body that names no connection: connection_id leads the log's primary key.
        connection = "" if e.connection_id is None else e.connection_id
        return (
            self.event_id, self.received_at, self.svix_timestamp, self.origin, connection,
            e.integration_name, e.integration_type, e.event_type, e.kind, e.resource,
            e.object_id, e.data, e.previous_attributes, e.body, e.body_sha256, e.redacted,
            e.unusable_reason,
        )

    def bare(self, reason: str) -> Record:
        """The same delivery reduced to its body, with every parsed and indexed field left
        out: what is stored when the database refuses the full row. Kept, flagged, never
        lost."""
        e = self.parsed
        bare = Parsed(e.body, e.body_sha256, e.redacted, unusable_reason=reason)
        return Record(self.event_id, self.received_at, self.svix_timestamp, self.origin, bare)


async def insert_records(conn: asyncpg.Connection, records: list[Record]) -> set[str]:
    """Insert in one statement; return the event ids that were new. One transaction."""
    columns: list[list[Any]] = [[] for _ in _COLUMNS]
    for record in records:
        for column, value in zip(columns, record.values(), strict=True):
            column.append(value)
    rows = await conn.fetch(APPEND_SQL, *columns)
    return {row["event_id"] for row in rows}


class Appender:
    """Group commit in front of mirror.events.

    ``append`` enqueues a record and waits for the batch that holds it to commit. A few
    flusher tasks drain the queue; while one batch is in flight the next one fills up, so the
    commit cost is shared by every request that arrived meanwhile.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 512, flushers: int = 4,
                 timeout: float = 10.0, max_pending: int = 10_000) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._timeout = timeout
        self._max_pending = max_pending
        self._queue: asyncio.Queue[tuple[Record, asyncio.Future[bool]]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._flusher(), name=f"appender-{i}")
                       for i in range(flushers)]
        self.last_batch_seconds = 0.0

    async def append(self, record: Record) -> bool:
        """Durably store ``record``; True if it is new, False if its event id was stored before.

        Raises DatabaseUnavailable when the database cannot take it in time (the caller answers
        503 and Svix retries; a retry of an event that did commit is a harmless duplicate).
        """
        if self._queue.qsize() >= self._max_pending:
            # The database is not keeping up (or hangs): refuse at once rather than hold an
            # ever longer queue of requests that will time out anyway.
            raise DatabaseUnavailable("too many appends waiting for the database")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            raise DatabaseUnavailable("database did not commit in time") from None

    async def close(self) -> None:
        """Finish what is queued, then stop the flushers. Safe to call twice."""
        for _ in range(1000):  # at most ~10 s for what is already queued
            if self._queue.empty() or all(t.done() for t in self._tasks):
                break
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _flusher(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            live = [(r, f) for r, f in batch if not f.done()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                new_ids = await self._store([r for r, _ in live])
            except Exception as exc:
                error: Exception = exc if isinstance(exc, DatabaseUnavailable) else \
                    DatabaseUnavailable(f"append failed: {type(exc).__name__}")
                if not isinstance(exc, DatabaseUnavailable):
                    log.error("append failed", extra={"error": repr(exc)})
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.last_batch_seconds = time.perf_counter() - started
            for record, future in live:
                # Two deliveries of one event in one batch: the first is new, the rest are not.
                is_new = record.event_id in new_ids
                new_ids.discard(record.event_id)
                if not future.done():
                    future.set_result(is_new)

    async def _store(self, records: list[Record]) -> set[str]:
        try:
            async with self._pool.acquire() as conn:
                try:
                    return await insert_records(conn, records)
                except asyncpg.PostgresError as exc:
                    if is_unavailable(exc):
                        raise
                    # One row the database will not take (a jsonb limit, say) must not fail
                    # its neighbours: store them one by one, that one without its JSON.
                    log.warning("batch append failed, retrying row by row",
                                extra={"sqlstate": exc.sqlstate})
                    return await self._store_singly(conn, records)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
            raise

    @staticmethod
    async def _store_singly(conn: asyncpg.Connection, records: list[Record]) -> set[str]:
        new: set[str] = set()
        for record in records:
            try:
                new |= await insert_records(conn, [record])
            except asyncpg.PostgresError as exc:
                if is_unavailable(exc):
                    raise
                log.warning("row refused, storing the body alone",
                            extra={"event_id": record.event_id, "sqlstate": exc.sqlstate})
                bare = record.bare(f"database refused the parsed row ({exc.sqlstate})")
                new |= await insert_records(conn, [bare])
        return new
