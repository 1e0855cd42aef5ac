"""Point-in-time reads through the SQL functions of history.sql (CLI and HTTP share these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from mirror.errors import AmbiguousObject, BadRequest

# "Now" for a state: after every valid_from, whatever clocks say.
CURRENT = datetime(9999, 12, 31, tzinfo=UTC)
AS_OF_SQL = """
SELECT mirror.object_connection($1, $2, $3, $5) AS connection_id,
       mirror.object_as_of($1, $2, $4, $3, $5) AS data
"""
HISTORY_SQL = """
SELECT valid_from, valid_to, data, event_id, event_type, derived
FROM mirror.object_history($1, $2, $3)
"""


def _translate(exc: asyncpg.PostgresError) -> Exception:
    if isinstance(exc, asyncpg.InvalidParameterValueError):
        return BadRequest(str(exc))
    return AmbiguousObject(str(exc))


async def object_as_of(conn: asyncpg.Connection, resource: str, object_id: str,
                       at: datetime | None, connection_id: str | None = None,
                       known_at: datetime | None = None) -> tuple[str | None, Any]:
    """(connection_id, state) of one object at ``at`` (None: its current state); state None
    when there is none."""
    at = at or CURRENT
    try:
        row = await conn.fetchrow(AS_OF_SQL, resource, object_id, connection_id, at, known_at)
    except (asyncpg.InvalidParameterValueError, asyncpg.CardinalityViolationError) as exc:
        raise _translate(exc) from None
    assert row is not None
    return row["connection_id"], row["data"]


async def object_history(conn: asyncpg.Connection, resource: str, object_id: str,
                         connection_id: str | None = None) -> list[dict[str, Any]]:
    """Every version of one object, oldest first."""
    try:
        rows = await conn.fetch(HISTORY_SQL, resource, object_id, connection_id)
    except (asyncpg.InvalidParameterValueError, asyncpg.CardinalityViolationError) as exc:
        raise _translate(exc) from None
    return [
        {"valid_from": r["valid_from"].isoformat(),
         "valid_to": r["valid_to"].isoformat() if r["valid_to"] else None,
         "data": r["data"], "event_id": r["event_id"], "event_type": r["event_type"],
         "derived": r["derived"]}
        for r in rows
    ]
