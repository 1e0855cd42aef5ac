"""`mirror rebuild [RESOURCE]`: fold projections again from the log, on their own fast path.

The rebuild runs in one transaction. Until it commits, every reader keeps seeing the relations
as they were (MVCC); at commit the rebuilt state replaces them at once. The projection workers
are paused for its duration (the partition table is locked, so their pages wait) and it folds
exactly the events they had folded, so nothing is lost or applied twice; they carry on from
their checkpoints after. Objects are folded whole, many at a time, and written with the same
set-based statements as a live page, with nothing to read back and nothing to update.
"""

from __future__ import annotations

import asyncpg

from mirror.errors import UnknownResource
from mirror.fold import FOLD_KINDS, fold
from mirror.projector import write_guarded
from mirror.store import ObjectKey, Outcome, load_folded_events
from projections import registry
from projections.base import Resource

CHUNK = 5000  # objects folded and written per round

KEYS_SQL = """
SELECT DISTINCT connection_id, object_id FROM mirror.events
WHERE resource = $1 AND unusable_reason IS NULL
"""


async def rebuild(conn: asyncpg.Connection, resource_name: str | None = None) -> dict[str, int]:
    """Rebuild one resource (or all); return the number of objects per resource."""
    if resource_name:
        found = registry.by_name(resource_name)
        if found is None:
            raise UnknownResource(f"unknown resource {resource_name!r}")
        chosen: tuple[Resource, ...] = (found,)
    else:
        chosen = registry.resources()
    counts: dict[str, int] = {}
    async with conn.transaction():
        await conn.execute("LOCK TABLE mirror.checkpoints IN EXCLUSIVE MODE")
        for resource in chosen:
            counts[resource.name] = await _rebuild_one(conn, resource)
    return counts


async def _rebuild_one(conn: asyncpg.Connection, resource: Resource) -> int:
    name = resource.name
    await conn.execute("DELETE FROM mirror.states WHERE resource = $1", name)
    await conn.execute("DELETE FROM mirror.objects WHERE resource = $1", name)
    await conn.execute("DELETE FROM mirror.poison WHERE resource = $1", name)
    # What the fold finds again is reopened by the upsert; what it does not is resolved.
    await conn.execute(
        "UPDATE mirror.anomalies SET resolved_at = now(), resolved_by = 'rebuild' "
        "WHERE resource = $1 AND kind = ANY($2::text[]) AND resolved_at IS NULL",
        name, list(FOLD_KINDS))
    # Table names come from the registry, never from input.
    await conn.execute(f"DELETE FROM mirror.{resource.table}")
    for child in resource.children:
        await conn.execute(f"DELETE FROM mirror.{child.table}")
    keys: list[ObjectKey] = [(name, r["connection_id"], r["object_id"])
                             for r in await conn.fetch(KEYS_SQL, name)]
    keys.sort()
    for start in range(0, len(keys), CHUNK):
        grouped = await load_folded_events(conn, keys[start : start + CHUNK])
        outcomes: list[Outcome] = []
        failed: list[tuple[ObjectKey, str, int]] = []
        for key, events in grouped.items():
            try:
                folded = fold(resource, events)
            except Exception as exc:
                failed.append((key, f"{type(exc).__name__}: {exc}",
                               max(e.position for e in events)))
                continue
            since = min((c.valid_from for c in folded.candidates), default=None)
            if since is None:
                continue
            outcomes.append(Outcome(key, since, False, None, folded, [], None, True))
        await write_guarded(conn, outcomes, failed)
    return len(keys)
