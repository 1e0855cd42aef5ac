"""Backfill from the Trackstar REST API: the objects that existed before the webhooks started.

Every object a list endpoint returns is appended as a snapshot event (mirror.trackstar.
snapshots) with origin ``backfill`` and event id ``backfill_`` + sha256 of connection, resource,
object id and the object's canonical JSON: the same object in the same state always gets the
same id, so running a backfill again (or resuming one) adds nothing, while an object that
changed is a new version.

Resuming
--------
``mirror.backfill_progress`` keeps, per connection, endpoint and filter set, the token of the
next page. It moves in the same transaction as that page's events, guarded by its previous
value, so a crash continues after the last committed page and two runs of one scope cannot
both commit a page. A finished scope starts over on the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TextIO

import asyncpg

from mirror.errors import MirrorError
from mirror.eventlog import Record, insert_records
from mirror.trackstar import listing
from mirror.trackstar.client import (
    MAX_PAGE_SIZE,
    AuthFailed,
    TrackstarClient,
    TrackstarError,
    Unsupported,
)
from mirror.trackstar.listing import endpoints_of, select_resources
from mirror.trackstar.snapshots import Snapshot, snapshot
from projections.base import Resource

log = logging.getLogger("mirror.trackstar.backfill")

SINCE_FILTER = "updated_date[gte]"


def backfill_event_id(snap: Snapshot, connection_id: str) -> str:
    """``backfill_`` + sha256 of connection, resource, id and canonical state."""
    return "backfill_" + snap.digest(connection_id).hex()


# ---------------------------------------------------------------------------------------------
# Progress on a terminal (or a log file)
# ---------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return str(timedelta(seconds=seconds))


class Progress:
    """One resource's progress: objects, pages, rate and ETA, as one line on ``stream``.

    On a terminal the line is redrawn in place; elsewhere a line is written at most every
    ``interval`` seconds, and always at the end.
    """

    def __init__(self, stream: TextIO | None, label: str, *,
                 clock: Callable[[], float] = time.monotonic, interval: float = 2.0) -> None:
        self._stream = stream
        self._label = label
        self._clock = clock
        self._interval = interval
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._started = clock()
        self._last_shown = -interval
        self._base_objects = 0      # committed by an earlier run: not part of this run's rate
        self.objects = 0
        self.pages = 0
        self.total: int | None = None

    def update(self, *, objects: int, pages: int, total: int | None) -> None:
        """Record the counts so far (resumed pages included) and redraw if due."""
        self.objects, self.pages, self.total = objects, pages, total
        now = self._clock()
        if self._tty or now - self._last_shown >= self._interval:
            self._show(self.line(), final=False)
            self._last_shown = now

    def start(self, *, objects: int, pages: int, total: int | None) -> None:
        """Counts that include what an earlier, interrupted run committed."""
        self._base_objects += objects - self.objects
        self.objects, self.pages, self.total = objects, pages, total

    def line(self, note: str = "") -> str:
        """The progress line as text."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = (self.objects - self._base_objects) / elapsed
        count = f"{self.objects:,}" + (f"/{self.total:,}" if self.total is not None else "")
        parts = [f"{self._label}: {count} objects", f"{self.pages:,} pages", f"{rate:,.0f}/s"]
        if note:
            parts.append(note)
        elif self.total is not None and rate > 0 and self.total >= self.objects:
            parts.append(f"ETA {_duration((self.total - self.objects) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        return ", ".join(parts)

    def finish(self, note: str) -> None:
        """The final line."""
        self._show(self.line(note), final=True)

    def _show(self, text: str, *, final: bool) -> None:
        if self._stream is None:
            return
        if self._tty:
            self._stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


# ---------------------------------------------------------------------------------------------
# Backfill
# ---------------------------------------------------------------------------------------------
INTEGRATION_SQL = """
SELECT integration_name FROM mirror.connections WHERE connection_id = $1 AND id = $1
"""
PROGRESS_INSERT_SQL = """
INSERT INTO mirror.backfill_progress (connection_id, endpoint, filters, resource)
VALUES ($1, $2, $3, $4)
ON CONFLICT (connection_id, endpoint, filters) DO NOTHING
"""
PROGRESS_READ_SQL = """
SELECT page_token, pages, objects, total_count, finished_at
FROM mirror.backfill_progress
WHERE connection_id = $1 AND endpoint = $2 AND filters = $3
"""
PROGRESS_RESTART_SQL = """
UPDATE mirror.backfill_progress
SET page_token = NULL, pages = 0, objects = 0, appended = 0, total_count = NULL,
    started_at = now(), updated_at = now(), finished_at = NULL
WHERE connection_id = $1 AND endpoint = $2 AND filters = $3 AND finished_at IS NOT NULL
"""
# Moves with the page's events, guarded by the previous token and page count: a page is
# committed by exactly one run.
PROGRESS_ADVANCE_SQL = """
UPDATE mirror.backfill_progress
SET page_token = $4, pages = pages + 1, objects = objects + $5, appended = appended + $6,
    total_count = $7, updated_at = now(),
    finished_at = CASE WHEN $4::text IS NULL THEN now() END
WHERE connection_id = $1 AND endpoint = $2 AND filters = $3
  AND page_token IS NOT DISTINCT FROM $8 AND pages = $9 AND finished_at IS NULL
"""


class BackfillConflict(MirrorError):
    """Another run committed a page of the same scope meanwhile."""


@dataclass
class ResourceResult:
    """What a backfill did for one resource."""

    resource: str
    status: str = "done"          # done | unsupported | failed
    objects: int = 0              # objects received by this run
    appended: int = 0             # of which new to the log
    pages: int = 0                # pages committed by this run
    skipped: int = 0              # objects without a usable id (not stored)
    resumed_pages: int = 0        # pages an interrupted run had committed before
    message: str = ""
    endpoints: list[str] = field(default_factory=list)


def since_filters(since: datetime | None) -> dict[str, str]:
    """The list filters for ``--since``: ``updated_date[gte]``, ISO 8601 in UTC."""
    if since is None:
        return {}
    text = since.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {SINCE_FILTER: text}


def _filters_key(filters: Mapping[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(filters.items()))



class _Scope:
    """One (connection, endpoint, filters) walk and its stored progress."""

    def __init__(self, conn: asyncpg.Connection, connection_id: str, resource: Resource,
                 endpoint: str, filters: Mapping[str, str]) -> None:
        self.conn = conn
        self.key = (connection_id, endpoint, _filters_key(filters))
        self.resource = resource
        self.endpoint = endpoint
        self.filters = dict(filters)
        self.token: str | None = None
        self.pages = 0
        self.objects = 0
        self.total: int | None = None

    async def load(self) -> bool:
        """Read (or create) the stored progress; True when resuming an interrupted walk."""
        await self.conn.execute(PROGRESS_INSERT_SQL, *self.key, self.resource.name)
        row = await self.conn.fetchrow(PROGRESS_READ_SQL, *self.key)
        assert row is not None
        if row["finished_at"] is not None:
            await self.conn.execute(PROGRESS_RESTART_SQL, *self.key)
            return False
        self.token, self.pages = row["page_token"], row["pages"]
        self.objects, self.total = row["objects"], row["total_count"]
        return self.pages > 0

    async def commit(self, records: list[Record], next_token: str | None, received: int,
                     total: int | None) -> int:
        """Append one page's events and move the progress, in one transaction."""
        async with self.conn.transaction():
            new = await insert_records(self.conn, records) if records else set()
            moved = await self.conn.execute(
                PROGRESS_ADVANCE_SQL, *self.key, next_token, received, len(new), total,
                self.token, self.pages)
            if moved != "UPDATE 1":
                raise BackfillConflict(
                    f"{self.endpoint}: another backfill of this connection committed the same "
                    "page; run one backfill per connection at a time")
        self.token = next_token
        self.pages += 1
        self.objects += received
        self.total = total
        return len(new)


class _Tally:
    """A resource's counts across its endpoints, as its progress line shows them."""

    def __init__(self, bar: Progress, endpoints: int) -> None:
        self.bar = bar
        self._endpoints = endpoints
        self._totals: dict[str, int | None] = {}
        self.objects = 0
        self.pages = 0

    def add(self, endpoint: str, *, objects: int, pages: int, total: int | None,
            resumed: bool = False) -> None:
        """Count a committed page (or, ``resumed``, what an earlier run committed)."""
        self.objects += objects
        self.pages += pages
        self._totals[endpoint] = total
        known = [t for t in self._totals.values() if t is not None]
        whole = sum(known) if len(known) == self._endpoints else None
        show = self.bar.start if resumed else self.bar.update
        show(objects=self.objects, pages=self.pages, total=whole)


async def backfill(conn: asyncpg.Connection, client: TrackstarClient, connection_id: str, *,
                   resources: Sequence[str] | None = None, since: datetime | None = None,
                   page_size: int = MAX_PAGE_SIZE, progress: TextIO | None = None,
                   now: Callable[[], datetime] = lambda: datetime.now(UTC),
                   ) -> list[ResourceResult]:
    """Append every object of the chosen resources (default: all) to the log as snapshots.

    A resource the integration does not support (501) or that keeps failing is reported and
    the next one is tried; a refused credential stops the run (nothing else can work).
    """
    chosen = select_resources(resources)
    integration = await conn.fetchval(INTEGRATION_SQL, connection_id)
    filters = since_filters(since)
    results: list[ResourceResult] = []
    for resource in chosen:
        result = ResourceResult(resource.name)
        results.append(result)
        bar = Progress(progress, resource.name)
        try:
            result.endpoints = await endpoints_of(client, resource, page_size)
            tally = _Tally(bar, len(result.endpoints))
            for endpoint in result.endpoints:
                scope = _Scope(conn, connection_id, resource, endpoint, filters)
                if await scope.load():
                    result.resumed_pages += scope.pages
                    log.info("resuming backfill", extra={
                        "resource": resource.name, "endpoint": endpoint, "pages": scope.pages})
                tally.add(endpoint, objects=scope.objects, pages=scope.pages,
                          total=scope.total, resumed=True)
                await _walk(scope, client, integration, result, tally, page_size, now)
            if not result.endpoints:
                result.message = "no warehouses, so no locations"
        except Unsupported as exc:
            result.status, result.message = "unsupported", str(exc)
        except AuthFailed:
            bar.finish("refused")
            raise
        except TrackstarError as exc:
            result.status, result.message = "failed", str(exc)
        bar.finish(result.status if result.status != "done"
                   else f"done, {result.appended:,} new events")
        log.info("backfill resource finished",
                 extra={"resource": resource.name, "status": result.status,
                        "objects": result.objects, "appended": result.appended,
                        "pages": result.pages, "detail": result.message})
    return results


async def _walk(scope: _Scope, client: TrackstarClient, integration: str | None,
                result: ResourceResult, tally: _Tally, page_size: int,
                now: Callable[[], datetime]) -> None:
    """Fetch and commit the pages of one scope, fetching page n+1 while page n commits."""
    seen: set[str] = set()
    connection_id = scope.key[0]
    fetch = asyncio.create_task(
        client.list_page(scope.endpoint, scope.filters, scope.token, page_size))
    try:
        while True:
            page = await fetch
            next_token = listing.next_token(page, seen, scope.endpoint)
            if next_token is not None:
                fetch = asyncio.create_task(
                    client.list_page(scope.endpoint, scope.filters, next_token, page_size))
            received_at = now()
            records: list[Record] = []
            for obj in page.data:
                snap = snapshot(scope.resource, connection_id, integration, obj, "backfill",
                                scope.endpoint)
                if snap is None:
                    result.skipped += 1
                    continue
                records.append(snap.record(backfill_event_id(snap, connection_id), "backfill",
                                           received_at))
            result.appended += await scope.commit(records, next_token, len(page.data),
                                                  page.total_count)
            result.objects += len(page.data)
            result.pages += 1
            tally.add(scope.endpoint, objects=len(page.data), pages=1, total=page.total_count)
            if next_token is None:
                return
    finally:
        if not fetch.done():
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, TrackstarError):
                await fetch


def render_results(results: Sequence[ResourceResult]) -> str:
    """The backfill summary printed at the end."""
    lines = []
    for r in results:
        detail = f"{r.objects:,} objects, {r.appended:,} new events, {r.pages} pages"
        if r.resumed_pages:
            detail += f" (resumed after {r.resumed_pages} committed pages)"
        if r.skipped:
            detail += f", {r.skipped} without a usable id skipped"
        if r.status != "done":
            detail = f"{r.status.upper()}: {r.message}"
        lines.append(f"{r.resource:<20} {detail}")
    return "\n".join(lines)

