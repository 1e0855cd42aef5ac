"""Helpers that build Trackstar envelopes and sign them with the svix library."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from mirror.sample import message_id, signed_headers
from tests.conftest import SECRET


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def envelope(event_type: str, data: dict[str, Any], *, connection_id: str = "conn_1",
             previous: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"connection_id": connection_id, "integration_name": "sandbox",
                           "integration_type": "wms", "event_type": event_type, "data": data}
    if previous is not None:
        env["previous_attributes"] = previous
    env.update(extra)
    return env


def signed(event: dict[str, Any] | bytes | str, *, secret: str = SECRET,
           msg_id: str | None = None, at: datetime | None = None,
           ) -> tuple[bytes, dict[str, str]]:
    """Body bytes and Svix headers signed by the svix library."""
    if isinstance(event, dict):
        body = orjson.dumps(event).decode()
    elif isinstance(event, bytes):
        body = event.decode()
    else:
        body = event
    return body.encode(), signed_headers(secret, body, msg_id or message_id(at), at)
