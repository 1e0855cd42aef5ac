"""Snapshot events: one object the REST API lists, as an event the log stores.

Every object a list endpoint returns is appended to ``mirror.events`` like a delivery:

* ``event_type`` is the resource's own ``<resource>.updated`` (``order.updated``,
  ``inbound-shipment.updated``, …) without ``previous_attributes``, so the registry routes it and
  the projector folds it like any full-object update, at the object's own ``updated_date``.
  Nothing in the projections knows about backfill.
* ``origin`` says where it came from: ``backfill``, ``reconcile`` for repairs, ``fetch`` for
  completed truncated deliveries.
* The stored body is a Trackstar-style envelope built from the object, parsed by
  mirror.parsing like any delivery, so credential redaction applies.

A deletion that reconcile repairs is a ``<resource>.deleted`` event (every resource accepts
one: projections.base) whose ``data`` holds the id and ``deleted_date``, the time reconcile
ran: the object leaves its current-state relation from then on, its history stays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from mirror import parsing
from mirror.errors import MirrorError
from mirror.eventlog import Record
from projections.base import Resource


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
    parsed: parsing.Parsed

    def record(self, event_id: str, origin: str, received_at: datetime) -> Record:
        """The log row for this snapshot."""
        return Record(event_id, received_at, None, origin, self.parsed)

    def digest(self, connection_id: str) -> bytes:
        """See content_digest."""
        return content_digest(connection_id, self.resource.name, self.object_id, self.data)


def snapshot(resource: Resource, connection_id: str, integration_name: str | None,
             obj: Mapping[str, Any], origin: str, source: str) -> Snapshot | None:
    """``obj`` as a snapshot envelope, parsed (and redacted) by mirror.parsing; None when it
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
    parsed = parsing.parse(canonical_json(doc))
    if parsed.unusable_reason is not None or parsed.object_id is None or parsed.data is None:
        return None
    data = parsing.loads(parsed.data)
    return Snapshot(resource, parsed.object_id, data, parsed)


def deletion(resource: Resource, connection_id: str, integration_name: str | None,
             object_id: str, deleted_at: datetime, origin: str) -> Snapshot:
    """The ``<resource>.deleted`` event that removes ``object_id``, dated ``deleted_at``."""
    key = "failed_url" if resource.key == "data.failed_url" else "id"
    doc: dict[str, Any] = {
        "connection_id": connection_id,
        "integration_type": "wms",
        "event_type": resource.deletion_kind,
        "data": {key: object_id,
                 "deleted_date": deleted_at.astimezone(UTC).isoformat().replace("+00:00", "Z")},
        "origin": origin,
    }
    if integration_name is not None:
        doc["integration_name"] = integration_name
    parsed = parsing.parse(canonical_json(doc))
    if parsed.unusable_reason is not None or parsed.object_id != object_id:
        raise MirrorError(f"cannot express the deletion of {resource.name} {object_id!r} "
                          f"as an event: {parsed.unusable_reason}")
    return Snapshot(resource, object_id, doc["data"], parsed)
