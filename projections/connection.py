"""Connections: `connection.created`, `connection.deleted`, `connection.historical-sync-completed`.

Keyed by the envelope's `connection_id`. Each event carries only a piece of the connection, so
the state is merged rather than replaced: created date, integration, and one entry per resource
whose historical sync completed. The access token of `connection.created` is never kept.
"""

from collections.abc import Mapping
from typing import Any

from projections.base import Column, Resource, normalise_kind

_SECRET_KEYS = frozenset({"access_token", "api_key", "refresh_token"})


def _merge(previous: dict[str, Any] | None, data: dict[str, Any],
           envelope: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = dict(previous or {})
    state["connection_id"] = envelope.get("connection_id")
    for key in ("integration_name", "integration_type"):
        if isinstance(envelope.get(key), str):
            state[key] = envelope[key]
    kind = normalise_kind(str(envelope.get("event_type", "")))
    if kind == "connection.historical-sync-completed":
        syncs = dict(state.get("historical_syncs") or {})
        resource = data.get("resource")
        if isinstance(resource, str):
            syncs[resource] = {k: v for k, v in data.items() if k != "resource"}
        state["historical_syncs"] = syncs
    else:
        state.update({k: v for k, v in data.items() if k not in _SECRET_KEYS})
    return state


RESOURCE = Resource(
    name="connection",
    table="connections",
    list_path=None,  # not listed by the REST API: webhooks only
    events=("connection.created", "connection.deleted", "connection.historical-sync-completed"),
    key="connection_id",
    deletes=("connection.deleted",),
    state=_merge,
    columns=(
        Column("integration_name"),
        Column("integration_type"),
        Column("deleted_date", "timestamptz"),
        Column("historical_syncs", "jsonb"),
    ),
)
