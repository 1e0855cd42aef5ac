"""`mirror status`: the log, the projections and what needs a human's attention."""

from __future__ import annotations

from typing import Any

import asyncpg

from mirror import progress

# The partitions each live worker holds, from the view of schema.sql.
OWNED_SQL = """
SELECT owner, array_agg(partition ORDER BY partition) AS parts
FROM mirror.partition_owners WHERE owner IS NOT NULL GROUP BY owner
"""


def ranges(parts: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2,5,7-8``."""
    spans: list[list[int]] = []
    for part in sorted(parts):
        if spans and part == spans[-1][1] + 1:
            spans[-1][1] = part
        else:
            spans.append([part, part])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


async def leases(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Each live worker's leases, with the partitions it holds listed (``parts``)."""
    # One snapshot and one now(): the counts and the lists agree.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        owned = {r["owner"]: list(r["parts"]) for r in await conn.fetch(OWNED_SQL)}
        held = await progress.leases(conn)
    return [{**w, "parts": owned.get(w["owner"], [])} for w in held]


async def gather(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything `mirror status` reports, as a dict."""
    log = await conn.fetchrow(
        "SELECT count(*) AS events, max(received_at) AS last_received, "
        "coalesce(max(position), 0) AS head, "
        "count(*) FILTER (WHERE unusable_reason IS NOT NULL) AS unprojectable "
        "FROM mirror.events")
    reasons = await conn.fetch(
        "SELECT unusable_reason AS reason, count(*) AS n FROM mirror.events "
        "WHERE unusable_reason IS NOT NULL GROUP BY 1 ORDER BY 2 DESC")
    unknown = await conn.fetch(
        "SELECT event_type, count(*) AS n FROM mirror.events "
        "WHERE unusable_reason = 'unknown event_type' GROUP BY 1 ORDER BY 2 DESC LIMIT 50")
    lag = await progress.projection_lag(conn)
    anomalies = await conn.fetch(
        "SELECT kind, count(*) FILTER (WHERE resolved_at IS NULL) AS open, "
        "count(*) FILTER (WHERE resolved_at IS NOT NULL) AS resolved "
        "FROM mirror.anomalies GROUP BY kind ORDER BY kind")
    poison = await conn.fetch(
        "SELECT resource, connection_id, object_id, reason FROM mirror.poison "
        "ORDER BY recorded_at DESC LIMIT 20")
    backfills = await conn.fetch(
        "SELECT connection_id, endpoint, objects, appended, total_count, pages, updated_at, "
        "finished_at FROM mirror.backfill_progress ORDER BY updated_at DESC LIMIT 20")
    return {
        "workers": await progress.live_workers(conn),
        "partitions": progress.PARTITIONS,
        "leases": await leases(conn),
        "backfills": [dict(r) for r in backfills],
        "events": log["events"],
        "head_position": log["head"],
        "last_received": log["last_received"],
        "unprojectable": log["unprojectable"],
        "unprojectable_reasons": {r["reason"]: r["n"] for r in reasons},
        "unknown_event_types": {r["event_type"]: r["n"] for r in unknown},
        "projection_lag_events": lag["events"],
        "projection_lag_seconds": lag["seconds"],
        "visibility_horizon_seconds": round(await progress.horizon_seconds(conn), 3),
        "anomalies": {r["kind"]: {"open": r["open"], "resolved": r["resolved"]}
                      for r in anomalies},
        "poisoned_objects": [dict(r) for r in poison],
    }


def render(report: dict[str, Any]) -> str:
    """A human-readable rendering of ``gather``'s report."""
    lines = [
        f"events stored:        {report['events']} (head position {report['head_position']})",
        f"last received:        {report['last_received'] or 'never'}",
        f"projection workers:   {report['workers']} alive (heartbeat within 15 s)",
        f"partitions:           {report['partitions']}, leased by "
        f"{len(report['leases'])} worker(s)",
        *[f"  {w['owner']}: {w['partitions']} partitions ({ranges(w['parts'])})"
          for w in report["leases"]],
        f"projection lag:       {report['projection_lag_events']} events, "
        f"{report['projection_lag_seconds']} s",
        f"visibility horizon:   {report['visibility_horizon_seconds']} s "
        "(age of the oldest open transaction)",
        f"unprojectable events: {report['unprojectable']}",
    ]
    for reason, count in report["unprojectable_reasons"].items():
        lines.append(f"  {count:>8}  {reason}")
    if report["unknown_event_types"]:
        lines.append("unknown event types:")
        for name, count in report["unknown_event_types"].items():
            lines.append(f"  {count:>8}  {name}")
    lines.append("anomalies:            " + (", ".join(
        f"{kind}: {v['open']} open, {v['resolved']} resolved"
        for kind, v in report["anomalies"].items()) or "none"))
    if report["backfills"]:
        lines.append("backfills:")
        for b in report["backfills"]:
            total = f"/{b['total_count']}" if b["total_count"] is not None else ""
            state = "done" if b["finished_at"] else "in progress"
            lines.append(f"  {b['connection_id']} {b['endpoint']}: {b['objects']}{total} objects, "
                         f"{b['appended']} new, {b['pages']} pages, {state}")
    lines.append(f"poisoned objects:     {len(report['poisoned_objects'])}")
    for row in report["poisoned_objects"]:
        lines.append(f"  {row['resource']} {row['connection_id']}/{row['object_id']}: "
                     f"{row['reason']}")
    return "\n".join(lines)
