"""Backfill from the Trackstar REST API: the objects that existed before the webhooks started,
and the full events behind truncated deliveries.

Snapshot convention
-------------------
Every object a list endpoint returns is appended to ``mirror.events`` like a delivery:

* ``event_type`` is the resource's own ``<resource>.updated`` (``order.updated``,
  ``inbound-shipment.updated``, …) without ``previous_attributes``, so the registry routes it and
  the projector folds it like any full-object update, at the object's own ``updated_date``.
  Nothing in the projections knows about backfill.
* ``origin`` says where it came from: ``backfill`` here, ``reconcile`` for repairs
  (mirror/reconcile.py), ``fetch`` for completed truncated deliveries.
* ``event_id`` is ``backfill_`` + sha256 of connection, resource, object id and the object's
  canonical JSON: the same object in the same state always gets the same id, so running a
  backfill again (or resuming one) adds nothing, while an object that changed is a new version.
* The stored body is a Trackstar-style envelope built from the object, parsed by
  mirror.envelope like any delivery, so credential redaction applies.

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
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import asyncpg
import orjson

from mirror import envelope as envelope_mod
from mirror.errors import MirrorError
from mirror.log import Record, insert_records
from mirror.trackstar_api import (
    LIST_PATHS,
    LOCATIONS_PATH,
    LOCATIONS_RESOURCE,
    MAX_PAGE_SIZE,
    RESOURCE_ORDER,
    AuthFailed,
    Page,
    TrackstarClient,
    TrackstarError,
    Unsupported,
)
from projections import registry
from projections.base import Resource, normalise_kind

log = logging.getLogger("mirror.backfill")

SINCE_FILTER = "updated_date[gte]"


# ---------------------------------------------------------------------------------------------
# Snapshot events
# ---------------------------------------------------------------------------------------------
def snapshot_event_type(resource: Resource) -> str:
    """The routed ``<resource>.updated`` event type a snapshot of ``resource`` is stored as."""
    for kind in resource.events:
        if kind.endswith(".updated") and kind.count(".") == 1:
            return kind
    raise MirrorError(f"resource {resource.name} has no <resource>.updated event")


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no spaces: equal objects give equal bytes."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()


def content_digest(connection_id: str, resource: str, object_id: str, data: Any) -> bytes:
    """sha256 of one object's identity and state (its redacted, canonical JSON)."""
    digest = hashlib.sha256()
    for part in (connection_id, resource, object_id):
        digest.update(part.encode())
        digest.update(b"\x00")
    digest.update(canonical_json(data))
    return digest.digest()


@dataclass(frozen=True)
class Snapshot:
    """One API object as a log envelope, before it gets its event id."""

    resource: Resource
    object_id: str
    data: dict[str, Any]           # as stored: credentials redacted
    envelope: envelope_mod.Envelope

    def record(self, event_id: str, origin: str, received_at: datetime) -> Record:
        """The log row for this snapshot."""
        return Record(event_id, received_at, None, origin, self.envelope)

    def digest(self, connection_id: str) -> bytes:
        """See content_digest."""
        return content_digest(connection_id, self.resource.name, self.object_id, self.data)


def snapshot(resource: Resource, connection_id: str, integration_name: str | None,
             obj: Mapping[str, Any], origin: str, source: str) -> Snapshot | None:
    """``obj`` as a snapshot envelope, parsed (and redacted) by mirror.envelope; None when it
    cannot be stored as a version (no usable id)."""
    doc: dict[str, Any] = {
        "connection_id": connection_id,
        "integration_name": integration_name,
        "integration_type": "wms",
        "event_type": snapshot_event_type(resource),
        "data": dict(obj),
        "origin": origin,
        "source": source,
    }
    if integration_name is None:
        del doc["integration_name"]
    parsed = envelope_mod.parse(canonical_json(doc))
    if parsed.unusable_reason is not None or parsed.object_id is None or parsed.data is None:
        return None
    data = envelope_mod.loads(parsed.data)
    return Snapshot(resource, parsed.object_id, data, parsed)


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


def select_resources(names: Iterable[str] | None) -> list[Resource]:
    """The resources to walk, in dependency order; every name must have a list endpoint."""
    available = [name for name in RESOURCE_ORDER if registry.by_name(name) is not None]
    if not names:
        wanted = available
    else:
        wanted = []
        for name in names:
            found = registry.by_name(name)
            if found is None or found.name not in available:
                raise MirrorError(f"no list endpoint for resource {name!r}; choose from "
                                  f"{', '.join(available)}")
            wanted.append(found.name)
        wanted = [name for name in available if name in wanted]
    out = []
    for name in wanted:
        resource = registry.by_name(name)
        assert resource is not None
        out.append(resource)
    return out


def since_filters(since: datetime | None) -> dict[str, str]:
    """The list filters for ``--since``: ``updated_date[gte]``, ISO 8601 in UTC."""
    if since is None:
        return {}
    text = since.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {SINCE_FILTER: text}


def _filters_key(filters: Mapping[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(filters.items()))


async def list_all(client: TrackstarClient, path: str, filters: Mapping[str, str],
                   page_size: int = MAX_PAGE_SIZE) -> list[dict[str, Any]]:
    """Every object of one list endpoint (in memory; for reconcile and warehouse ids)."""
    out: list[dict[str, Any]] = []
    token: str | None = None
    seen: set[str] = set()
    while True:
        page = await client.list_page(path, filters, token, page_size)
        out.extend(page.data)
        token = _next(page, seen, path)
        if token is None:
            return out


def _next(page: Page, seen: set[str], path: str) -> str | None:
    token = page.next_token
    if token is not None:
        if token in seen:
            raise TrackstarError(200, f"{path}: the API returned page token {token!r} twice")
        seen.add(token)
    return token


async def endpoints_of(client: TrackstarClient, resource: Resource,
                       page_size: int = MAX_PAGE_SIZE) -> list[str]:
    """The list paths of a resource: one, or one per warehouse for warehouse locations."""
    if resource.name != LOCATIONS_RESOURCE:
        return [LIST_PATHS[resource.name]]
    warehouses = await list_all(client, LIST_PATHS["warehouse"], {}, page_size)
    ids = sorted({str(w["id"]) for w in warehouses
                  if isinstance(w.get("id"), str | int) and not isinstance(w.get("id"), bool)})
    return [LOCATIONS_PATH.format(warehouse_id=i) for i in ids]


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
            next_token = _next(page, seen, scope.endpoint)
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


# ---------------------------------------------------------------------------------------------
# Truncated deliveries
# ---------------------------------------------------------------------------------------------
FETCH_PREFIX = "fetch_"
TRUNCATED_SQL = """
SELECT e.event_id, e.connection_id, e.object_id, e.body
FROM mirror.events e
WHERE e.unusable_reason = 'data truncated'
  AND ($1::text IS NULL OR e.connection_id = $1)
  AND NOT EXISTS (SELECT 1 FROM mirror.events f WHERE f.event_id = 'fetch_' || e.event_id)
ORDER BY e.position
LIMIT $2
"""


@dataclass(frozen=True)
class FetchResult:
    """What fetch-truncated did with one truncated delivery."""

    event_id: str
    status: str          # fetched | duplicate | failed
    message: str = ""


def completed_event(stub: Mapping[str, Any], fetched: Any) -> dict[str, Any]:
    """The full event for a truncated ``stub`` from what its ``data_url`` answered: either
    the whole event, or just the object (then the stub's envelope is kept around it)."""
    if isinstance(fetched, dict) and isinstance(fetched.get("data"), dict) \
            and "event_type" in fetched:
        if fetched.get("data_truncated") is True:
            raise MirrorError("data_url answered a truncated event again")
        full = dict(fetched)
        for key in ("connection_id", "event_type"):
            if key in full and key in stub and \
                    normalise_kind(str(full[key])) != normalise_kind(str(stub[key])):
                raise MirrorError(f"the fetched event's {key} differs from the delivery's")
    elif isinstance(fetched, dict) and "id" in fetched:
        full = {k: v for k, v in stub.items() if k != "data"}
        full["data"] = fetched
    else:
        raise MirrorError("data_url answered neither an event nor an object")
    # The delivery's envelope is what Svix signed: it names the event.
    for key in ("connection_id", "event_type", "integration_name", "integration_type"):
        if key in stub:
            full[key] = stub[key]
    if "previous_attributes" not in full and isinstance(stub.get("previous_attributes"), dict):
        full["previous_attributes"] = stub["previous_attributes"]
    full.pop("data_truncated", None)
    full.pop("data_url", None)
    return full


async def fetch_truncated(conn: asyncpg.Connection, client: TrackstarClient, *,
                          connection_id: str | None = None, limit: int = 1000,
                          now: Callable[[], datetime] = lambda: datetime.now(UTC),
                          ) -> list[FetchResult]:
    """Complete truncated deliveries: fetch each one's ``data_url`` (with the API key only)
    and append the full event as origin ``fetch``, event id ``fetch_`` + the delivery's id.

    The stub itself stays in the log, unprojected; the completing event takes its place in
    the object's history (appended after the stub, it wins a tie with it by log order).
    """
    rows = await conn.fetch(TRUNCATED_SQL, connection_id, limit)
    results: list[FetchResult] = []
    for row in rows:
        event_id = row["event_id"]
        try:
            stub = envelope_mod.loads(bytes(row["body"]))
            data_url = stub.get("data_url") if isinstance(stub, dict) else None
            if not isinstance(data_url, str) or not data_url:
                raise MirrorError("the delivery carries no data_url")
            full = completed_event(stub, await client.fetch_event(data_url))
            parsed = envelope_mod.parse(canonical_json(full))
            if parsed.unusable_reason is not None:
                raise MirrorError(f"the fetched event is not usable: {parsed.unusable_reason}")
            if parsed.object_id != row["object_id"]:
                raise MirrorError("the fetched event is about another object")
            record = Record(FETCH_PREFIX + event_id, now(), None, "fetch", parsed)
            new = await insert_records(conn, [record])
            results.append(FetchResult(event_id, "fetched" if new else "duplicate"))
        except AuthFailed:
            raise  # the API key is refused: no other event can do better
        except (MirrorError, ValueError, UnicodeDecodeError) as exc:
            log.warning("truncated event not completed",
                        extra={"event_id": event_id, "error": str(exc)[:300]})
            results.append(FetchResult(event_id, "failed", str(exc)[:300]))
    return results


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
