"""`mirror rebuild [RESOURCE]`: re-fold projections from the log.

The rebuild runs in one transaction. Until it commits, every reader keeps seeing the live
relations as they were (MVCC); at commit the rebuilt state replaces them at once. The
projection workers are paused for its duration by holding every partition's advisory lock,
so nothing they write can be lost in the swap; they catch up from their checkpoints after.
"""

from __future__ import annotations

import asyncpg

from mirror.errors import NotFound
from mirror.projector import (
    _LOCK_CLASS,
    LOAD_SQL,
    PARTITIONS,
    events_from_rows,
    fold_objects,
    write_guarded,
)
from projections import registry
from projections.base import Resource

CHUNK = 2000


async def rebuild(conn: asyncpg.Connection, resource_name: str | None = None) -> dict[str, int]:
    """Rebuild one resource (or all); return the number of objects per resource."""
    if resource_name:
        found = registry.by_name(resource_name)
        if found is None:
            raise NotFound(f"unknown resource {resource_name!r}")
        chosen: tuple[Resource, ...] = (found,)
    else:
        chosen = registry.resources()
    counts: dict[str, int] = {}
    async with conn.transaction():
        for part in range(PARTITIONS):
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_CLASS, part)
        for resource in chosen:
            counts[resource.name] = await _rebuild_one(conn, resource)
    return counts


async def _rebuild_one(conn: asyncpg.Connection, resource: Resource) -> int:
    name = resource.name
    await conn.execute("DELETE FROM mirror.versions WHERE resource = $1", name)
    await conn.execute("DELETE FROM mirror.changes WHERE resource = $1", name)
    await conn.execute("DELETE FROM mirror.objects WHERE resource = $1", name)
    await conn.execute("DELETE FROM mirror.poison WHERE resource = $1", name)
    # Table names come from the registry, never from input.
    await conn.execute(f"DELETE FROM mirror.{resource.table}")
    for child in resource.children:
        await conn.execute(f"DELETE FROM mirror.{child.table}")
    keys = await conn.fetch(
        "SELECT DISTINCT connection_id, object_id FROM mirror.events "
        "WHERE resource = $1 AND unusable_reason IS NULL ORDER BY 1, 2", name)
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        params = [[name] * len(chunk), [k["connection_id"] for k in chunk],
                  [k["object_id"] for k in chunk]]
        rows = await conn.fetch(LOAD_SQL, *params)
        grouped = events_from_rows(rows)
        histories, poisoned = fold_objects(grouped, {})
        await write_guarded(conn, histories, poisoned, {})
    return len(keys)
