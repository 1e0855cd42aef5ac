"""Reconcile: compare the mirror's current state with the Trackstar API's lists, report the
drift, and optionally repair it with snapshot events.

Drift comes in three kinds: an object the API lists that the mirror lacks (``missing_here``),
an object the mirror holds that the API no longer lists (``missing_there``), and an object whose
state differs (``differs``, by dotted path, as mirror.paths.changes writes them).

``--repair`` appends the API's state as a snapshot event (origin ``reconcile``, routed as
``<resource>.updated``, exactly like a backfill snapshot) for every object missing here and every
differing object whose API state is not older than the mirror's: the mirror never goes back in
time because a list was stale (a newer webhook wins; the README's "How time and order work").
A repair's event id is ``reconcile_`` + a KSUID carrying the time of the reconciliation; when the
API state has the same ``updated_date`` as the mirror's (a change the WMS made without touching
it), the repair, appended last, wins the tie by log order.

An object missing there gets a deletion event (``<resource>.deleted``, origin ``reconcile``,
``deleted_date`` = when reconcile ran) only when the resource's listing was complete and
error-free: every page answered, as many objects as the API's ``total_count`` said, no page
token handed out twice. A listing that failed deletes nothing (nothing at all is repaired
for that resource); one that was cut short repairs what it saw but deletes nothing. An object
whose latest event arrived after the listing started is not deleted either: it may have been
created after the API listed that page. Every drift found by ``--repair`` is recorded in
``mirror.anomalies`` (kind ``drift``), resolved at once when repaired.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from mirror import ksuid, paths
from mirror.db import json_text
from mirror.eventlog import Record, insert_records
from mirror.store import columns
from mirror.trackstar.client import (
    MAX_PAGE_SIZE,
    AuthFailed,
    TrackstarClient,
    TrackstarError,
    Unsupported,
)
from mirror.trackstar.listing import endpoints_of, next_token, select_resources
from mirror.trackstar.snapshots import Snapshot, deletion, snapshot
from projections.base import Resource, parse_time

log = logging.getLogger("mirror.trackstar.reconcile")

REPAIR_PREFIX = "reconcile_"

INTEGRATION_SQL = """
SELECT integration_name FROM mirror.connections WHERE connection_id = $1 AND id = $1
"""
# Events of this connection and these resources that the projection has not folded yet: while
# there are any, the current state lags the log and drift may only be that lag.
# "Not folded yet" has one definition, the view mirror.unprojected_events (schema.sql).
UNPROJECTED_SQL = """
SELECT count(*)
FROM mirror.unprojected_events
WHERE connection_id = $1 AND resource = ANY($2::text[]) AND unusable_reason IS NULL
"""
# When the mirror last received an event about each of these objects.
LAST_RECEIVED_SQL = """
SELECT object_id, max(received_at) AS last
FROM mirror.events
WHERE resource = $1 AND connection_id = $2 AND object_id = ANY($3::text[])
GROUP BY object_id
"""
RECORD_DRIFT_SQL = """
INSERT INTO mirror.anomalies (resource, connection_id, object_id, kind, at, event_id, paths,
                              detail, resolved_at, resolved_by)
SELECT r, $1, o, 'drift', $2::timestamptz, e,
       ARRAY(SELECT jsonb_array_elements_text(p::jsonb)), d::jsonb,
       CASE WHEN fixed THEN $2::timestamptz END, CASE WHEN fixed THEN 'reconcile --repair' END
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::boolean[])
     AS u(r, o, e, p, d, fixed)
ON CONFLICT (resource, object_id, connection_id, kind, at, event_id) DO NOTHING
"""


def repair_event_id(at: datetime, digest: bytes) -> str:
    """``reconcile_`` + a KSUID: ``at`` in its first 4 bytes, then 16 bytes of ``digest``."""
    seconds = min(int(at.timestamp()) - ksuid.EPOCH, 2**32 - 1)
    return REPAIR_PREFIX + ksuid.encode(seconds, digest)


@dataclass
class Drift:
    """One object on which the mirror and the API disagree."""

    object_id: str
    kind: str                                   # missing_here | missing_there | differs
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # path, mirror, API
    mirror_updated: str | None = None
    api_updated: str | None = None
    repairable: bool = False
    reason: str = ""                            # why it cannot be repaired
    repaired: bool = False
    event_id: str | None = None                 # the repair event


async def unprojected_events(conn: asyncpg.Connection, connection_id: str,
                             resource: str) -> int:
    """Events of this connection and resource not folded into current state yet.

    The one place reconcile depends on how the projection engine keeps its progress."""
    count: int = await conn.fetchval(UNPROJECTED_SQL, connection_id, [resource])
    return count


@dataclass
class ResourceDrift:
    """The comparison of one resource."""

    resource: str
    status: str = "ok"            # ok | incomplete | unsupported | failed
    api_objects: int = 0
    mirror_objects: int = 0
    unprojected: int = 0          # events not folded yet when the comparison ran
    skipped: int = 0              # API objects without a usable id
    drifts: list[Drift] = field(default_factory=list)
    message: str = ""

    @property
    def unrepaired(self) -> int:
        """Drift still standing after this run."""
        return sum(1 for d in self.drifts if not d.repaired)


_MIRROR_SQL: dict[str, str] = {}


def _mirror_sql(resource: Resource) -> str:
    # The table name comes from the registry (checked identifiers), never from input.
    found = _MIRROR_SQL.get(resource.name)
    if found is None:
        found = _MIRROR_SQL[resource.name] = (
            f"SELECT id, data FROM mirror.{resource.table} WHERE connection_id = $1")
    return found


def _time_of(data: dict[str, Any] | None) -> datetime | None:
    if data is None:
        return None
    for name in ("updated_date", "trackstar_updated_date"):
        parsed = parse_time(data.get(name))
        if parsed is not None:
            return parsed
    return None


def compare(mirror: dict[str, dict[str, Any]], api: dict[str, Snapshot]) -> list[Drift]:
    """The drift between the mirror's current objects and the API's, sorted by id."""
    drifts: list[Drift] = []
    for object_id in sorted(mirror.keys() | api.keys()):
        here = mirror.get(object_id)
        there = api[object_id].data if object_id in api else None
        here_time, there_time = _time_of(here), _time_of(there)
        mirror_updated = here_time.isoformat() if here_time else None
        api_updated = there_time.isoformat() if there_time else None
        if here is None:
            drifts.append(Drift(object_id, "missing_here", mirror_updated=mirror_updated,
                                api_updated=api_updated, repairable=True))
        elif there is None:
            drifts.append(Drift(object_id, "missing_there", mirror_updated=mirror_updated,
                                api_updated=api_updated, repairable=True))
        else:
            changed = paths.changes(here, there)
            if not changed:
                continue
            drift = Drift(object_id, "differs", changed, mirror_updated=mirror_updated,
                          api_updated=api_updated, repairable=True)
            if here_time is not None and there_time is not None and there_time < here_time:
                drift.repairable = False
                drift.reason = "the mirror holds a newer version than the API lists"
            drifts.append(drift)
    return drifts


@dataclass
class Listing:
    """Everything the API listed for one resource, and whether that is all it has."""

    objects: dict[str, Snapshot] = field(default_factory=dict)
    skipped: int = 0
    short: str = ""               # why the listing is not complete ("" when it is)


async def list_resource(client: TrackstarClient, resource: Resource, connection_id: str,
                        integration: str | None, page_size: int) -> Listing:
    """Every object of ``resource`` the API lists. Raises TrackstarError when a page fails
    (after the client's retries); ``short`` says when the pages ended before ``total_count``."""
    listing = Listing()
    for endpoint in await endpoints_of(client, resource, page_size):
        token: str | None = None
        seen: set[str] = set()
        received = 0
        while True:
            page = await client.list_page(endpoint, {}, token, page_size)
            received += len(page.data)
            for obj in page.data:
                snap = snapshot(resource, connection_id, integration, obj, "reconcile", endpoint)
                if snap is None:
                    listing.skipped += 1
                else:
                    listing.objects[snap.object_id] = snap
            token = next_token(page, seen, endpoint)
            if token is None:
                break
        if page.total_count is not None and received < page.total_count and not listing.short:
            listing.short = (f"{endpoint} listed {received} of the {page.total_count} objects "
                             "it counts")
    return listing


async def reconcile(conn: asyncpg.Connection, client: TrackstarClient, connection_id: str, *,
                    resources: Sequence[str] | None = None, repair: bool = False,
                    page_size: int = MAX_PAGE_SIZE,
                    now: Callable[[], datetime] = lambda: datetime.now(UTC),
                    ) -> list[ResourceDrift]:
    """Compare each chosen resource (default: all with a list endpoint); with ``repair``,
    append the API's state where it is missing or newer, delete what a complete listing no
    longer holds, and record the drift."""
    chosen = select_resources(resources)
    integration = await conn.fetchval(INTEGRATION_SQL, connection_id)
    reports: list[ResourceDrift] = []
    for resource in chosen:
        report = ResourceDrift(resource.name)
        reports.append(report)
        started = now()
        try:
            listing = await list_resource(client, resource, connection_id, integration,
                                          page_size)
        except Unsupported as exc:
            report.status, report.message = "unsupported", str(exc)
            continue
        except AuthFailed:
            raise
        except TrackstarError as exc:
            report.status = "failed"
            report.message = f"the listing failed, nothing compared or repaired: {exc}"
            continue
        api = listing.objects
        report.skipped = listing.skipped
        report.unprojected = await unprojected_events(conn, connection_id, resource.name)
        rows = await conn.fetch(_mirror_sql(resource), connection_id)
        mirror = {row["id"]: row["data"] for row in rows}
        report.api_objects, report.mirror_objects = len(api), len(mirror)
        report.drifts = compare(mirror, api)
        if listing.short:
            report.status = "incomplete"
            report.message = f"the listing was cut short, nothing deleted: {listing.short}"
        await _guard_deletions(conn, resource, connection_id, report, listing, started)
        if repair and report.drifts:
            await _repair(conn, connection_id, integration, resource, report.drifts, api, now())
        log.info("reconciled", extra={"resource": resource.name, "api": len(api),
                                      "mirror": len(mirror), "drift": len(report.drifts),
                                      "repaired": len(report.drifts) - report.unrepaired,
                                      "status": report.status})
    return reports


async def _guard_deletions(conn: asyncpg.Connection, resource: Resource, connection_id: str,
                           report: ResourceDrift, listing: Listing, started: datetime) -> None:
    """Keep a deletion repairable only when it is safe: a complete listing, and no event
    about the object received since the listing began."""
    gone = [d for d in report.drifts if d.kind == "missing_there"]
    if not gone:
        return
    if listing.short:
        for drift in gone:
            drift.repairable = False
            drift.reason = f"not deleted: the listing was cut short ({listing.short})"
        return
    rows = await conn.fetch(LAST_RECEIVED_SQL, resource.name, connection_id,
                            [d.object_id for d in gone])
    last = {row["object_id"]: row["last"] for row in rows}
    for drift in gone:
        received = last.get(drift.object_id)
        if received is not None and received >= started:
            drift.repairable = False
            drift.reason = "not deleted: an event about it arrived while the API was listed"


async def _repair(conn: asyncpg.Connection, connection_id: str, integration: str | None,
                  resource: Resource, drifts: list[Drift], api: dict[str, Snapshot],
                  at: datetime) -> None:
    """Append the repairs and record the drift, in one transaction."""
    run_label = f"reconcile@{at.isoformat()}"
    records: list[Record] = []
    for drift in drifts:
        if not drift.repairable:
            continue
        if drift.kind == "missing_there":
            snap = deletion(resource, connection_id, integration, drift.object_id, at,
                            "reconcile")
        else:
            snap = api[drift.object_id]
        drift.event_id = repair_event_id(at, snap.digest(connection_id))
        records.append(snap.record(drift.event_id, "reconcile", at))
    rows: list[tuple[str, str, str, str, str, bool]] = []
    for drift in drifts:
        detail: dict[str, Any] = {"drift": drift.kind, "mirror_updated_date": drift.mirror_updated,
                                  "api_updated_date": drift.api_updated,
                                  "repaired": drift.repairable}
        if drift.kind == "missing_there" and drift.repairable:
            detail["repair"] = "deleted"
        if drift.reason:
            detail["reason"] = drift.reason
        if drift.changes:
            detail["changes"] = [{"path": p, "mirror": old, "api": new}
                                 for p, old, new in drift.changes[:100]]
        rows.append((resource.name, drift.object_id, drift.event_id or run_label,
                     orjson.dumps([p for p, _, _ in drift.changes]).decode(),
                     json_text(detail) or "{}", drift.repairable))
    async with conn.transaction():
        if records:
            await insert_records(conn, records)
        await conn.execute(RECORD_DRIFT_SQL, connection_id, at, *columns(rows, 6))
    for drift in drifts:
        drift.repaired = drift.repairable


def _short(value: Any) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def render(reports: Sequence[ResourceDrift], *, repair: bool, limit: int = 50) -> str:
    """The drift report as text."""
    lines: list[str] = []
    for report in reports:
        if report.status not in {"ok", "incomplete"}:
            lines.append(f"{report.resource}: {report.status.upper()}: {report.message}")
            continue
        head = (f"{report.resource}: {report.api_objects:,} in the API, "
                f"{report.mirror_objects:,} in the mirror")
        if not report.drifts:
            lines.append(head + ": in line")
        else:
            kinds = {k: sum(1 for d in report.drifts if d.kind == k)
                     for k in ("missing_here", "missing_there", "differs")}
            lines.append(head + f": {len(report.drifts)} drifted (" + ", ".join(
                f"{n} {k.replace('_', ' ')}" for k, n in kinds.items() if n) + ")")
        if report.status == "incomplete":
            lines.append(f"  INCOMPLETE: {report.message}")
        if report.unprojected:
            lines.append(f"  warning: {report.unprojected} events of this resource are not "
                         "projected yet; some drift may only be projection lag")
        for drift in report.drifts[:limit]:
            text = f"  {drift.kind.replace('_', ' '):<13} {drift.object_id}"
            if drift.changes:
                text += "  " + "; ".join(f"{p}: {_short(old)} -> {_short(new)}"
                                         for p, old, new in drift.changes[:5])
                if len(drift.changes) > 5:
                    text += f"; ... {len(drift.changes) - 5} more paths"
            if drift.repaired:
                text += "  [deleted]" if drift.kind == "missing_there" else "  [repaired]"
            elif repair or drift.reason:
                text += f"  [not repaired: {drift.reason or 'not repairable'}]"
            lines.append(text)
        if len(report.drifts) > limit:
            lines.append(f"  ... and {len(report.drifts) - limit} more (see --json)")
    return "\n".join(lines)


def as_json(reports: Sequence[ResourceDrift]) -> list[dict[str, Any]]:
    """The drift report as JSON-ready dicts."""
    out = []
    for report in reports:
        item = asdict(report)
        for drift in item["drifts"]:
            drift["changes"] = [{"path": p, "mirror": old, "api": new}
                                for p, old, new in drift["changes"]]
        out.append(item)
    return out
