"""What a Trackstar resource module declares: its events, its key, its typed columns, its children.

A resource module in this package defines one module-level ``RESOURCE = Resource(...)``; the
registry finds it by itself, so adding a resource is adding a file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

# connection_id, event_type and the object key are indexed together in mirror.events;
# PostgreSQL refuses a B-tree entry over 2704 bytes, so each is held to this many UTF-8 bytes.
MAX_KEY_BYTES = 768
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
SqlType = Literal["text", "numeric", "boolean", "timestamptz", "jsonb", "integer"]
KeyKind = Literal["data.id", "connection_id", "data.failed_url"]


def normalise_kind(event_type: str) -> str:
    """Routing form of an event type: lower case, with ``_`` and ``-`` made equivalent."""
    return event_type.strip().lower().replace("_", "-")


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 string as an aware UTC datetime (naive means UTC); None if it is not one."""
    if not isinstance(value, str) or not 10 <= len(value) <= 64:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _cast(value: Any, sql_type: SqlType) -> Any:
    """Python value for a typed column, or None when the payload's value does not fit."""
    if value is None:
        return None
    if sql_type == "jsonb":
        return value
    if sql_type == "text":
        if isinstance(value, str):
            return value if "\x00" not in value else None
        if isinstance(value, bool | int | float):
            return str(value)
        return None
    if sql_type == "boolean":
        return value if isinstance(value, bool) else None
    if sql_type == "timestamptz":
        return parse_time(value)
    if isinstance(value, bool):
        return None
    if sql_type == "integer":
        if isinstance(value, int) and -(2**31) <= value < 2**31:
            return value
        return None
    # numeric
    if isinstance(value, int | float | str):
        try:
            number = Decimal(str(value))
        except (InvalidOperation, ValueError):
            return None
        return number if number.is_finite() else None
    return None


def dig(obj: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` of nested dicts, or None where the path does not exist."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


@dataclass(frozen=True)
class Column:
    """A typed column extracted from the object's JSON."""

    name: str
    sql_type: SqlType = "text"
    path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _IDENT.match(self.name):
            raise ValueError(f"bad column name {self.name!r}")
        if not self.path:
            object.__setattr__(self, "path", (self.name,))

    def extract(self, obj: Mapping[str, Any]) -> Any:
        return _cast(dig(obj, self.path), self.sql_type)


@dataclass(frozen=True)
class Child:
    """A relation with one row per element of an array in the object."""

    table: str
    array: str
    parent_column: str
    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        for name in (self.table, self.parent_column):
            if not _IDENT.match(name):
                raise ValueError(f"bad identifier {name!r}")


StateFn = Callable[[dict[str, Any] | None, dict[str, Any], Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Resource:
    """One Trackstar resource: its events, key, current-state relation and children."""

    name: str
    table: str
    events: tuple[str, ...]
    key: KeyKind = "data.id"
    columns: tuple[Column, ...] = ()
    children: tuple[Child, ...] = ()
    deletes: tuple[str, ...] = ()
    # How one event's data turns into the object's state. The default is "data is the whole
    # object"; resources whose events carry partial payloads (connections) merge instead.
    state: StateFn | None = field(default=None, compare=False)
    # The Trackstar REST list endpoint (mirror.trackstar: backfill, reconcile). Every resource
    # must say it, None meaning "the API lists no such objects", so a resource is never left
    # out of a backfill by omission. ``{parent_id}`` in the path is filled with the id of
    # every object of ``list_parent`` (warehouse locations are listed per warehouse).
    list_path: str | None = field(kw_only=True)
    list_parent: str | None = field(default=None, kw_only=True)
    # Place in the walk order of backfill and reconcile: lower first, so the things others
    # refer to (warehouses, products) come before the things that refer to them (orders).
    walk_order: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        for name in (self.name, self.table):
            if not _IDENT.match(name):
                raise ValueError(f"bad identifier {name!r}")
        # Every resource accepts ``<resource>.deleted`` as a deletion, whether Trackstar sends
        # it (connection, connection-error) or `mirror reconcile --repair` appends it for an
        # object the API no longer lists (origin reconcile).
        events = tuple(normalise_kind(e) for e in self.events)
        deletes = tuple(normalise_kind(e) for e in self.deletes)
        if self.deletion_kind not in events:
            events += (self.deletion_kind,)
        if self.deletion_kind not in deletes:
            deletes += (self.deletion_kind,)
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "deletes", deletes)
        if self.list_path is not None:
            if not self.list_path.startswith("/") or "?" in self.list_path:
                raise ValueError(f"{self.name}: list_path must be a path, got {self.list_path!r}")
            if (self.list_parent is None) != ("{parent_id}" not in self.list_path):
                raise ValueError(f"{self.name}: list_path has {{parent_id}} exactly when "
                                 "list_parent names the resource whose ids fill it")
        elif self.list_parent is not None:
            raise ValueError(f"{self.name}: list_parent without a list_path")

    @property
    def deletion_kind(self) -> str:
        """The routed ``<resource>.deleted`` event type that removes an object."""
        return normalise_kind(self.name + ".deleted")

    def object_key(self, envelope: Mapping[str, Any]) -> str | None:
        """The object's id within its connection, or None when the envelope lacks it."""
        if self.key == "connection_id":
            value = envelope.get("connection_id")
        else:
            data = envelope.get("data")
            field_name = "id" if self.key == "data.id" else "failed_url"
            value = data.get(field_name) if isinstance(data, dict) else None
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            value = str(value)
        # Bytes, not characters: the key is indexed (see MAX_KEY_BYTES).
        if (not isinstance(value, str) or not value or "\x00" in value
                or len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES):
            return None
        return value

    def next_state(self, previous: dict[str, Any] | None, data: dict[str, Any],
                   envelope: Mapping[str, Any]) -> dict[str, Any]:
        """The object's state after an event with this ``data``."""
        if self.state is None:
            return data
        return self.state(previous, data, envelope)
