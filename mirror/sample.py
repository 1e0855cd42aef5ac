"""Sign and post a sample Trackstar event: for the README quickstart and for users testing
their setup end to end."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from svix.webhooks import Webhook

from mirror import ksuid


def message_id(at: datetime | None = None) -> str:
    """A Svix-style message id created at ``at`` (default: now); see mirror.ksuid."""
    return ksuid.message_id(at or datetime.now(UTC))


def sample_event(event_type: str = "order.created", object_id: str | None = None,
                 at: datetime | None = None) -> dict[str, Any]:
    """A realistic order envelope."""
    now = (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    object_id = object_id or f"ord_{secrets.token_hex(6)}"
    return {
        "connection_id": "conn_sample",
        "integration_name": "sandbox",
        "integration_type": "wms",
        "event_type": event_type,
        "data": {
            "id": object_id,
            "order_number": "SO-1001",
            "status": "open",
            "created_date": now,
            "updated_date": now,
            "warehouse_id": "wh_1",
            "line_items": [{"product_id": "p_1", "sku": "SKU-1", "quantity": 2,
                            "unit_price": 9.5, "is_picked": False}],
            "shipments": [],
        },
    }


def signed_headers(secret: str, body: str, msg_id: str | None = None,
                   at: datetime | None = None) -> dict[str, str]:
    """Svix headers for ``body``, signed with ``secret`` by the svix library."""
    when = at or datetime.now(UTC)
    msg_id = msg_id or message_id(when)
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(when.timestamp())),
        "svix-signature": Webhook(secret).sign(msg_id, when, body),
        "content-type": "application/json",
    }


async def send_sample(url: str, secret: str, event_type: str = "order.created",
                      object_id: str | None = None) -> tuple[int, str, dict[str, Any]]:
    """Post one signed sample event; return the HTTP status, the answer and the event."""
    event = sample_event(event_type, object_id)
    body = orjson.dumps(event).decode()
    async with aiohttp.ClientSession() as session, session.post(
        url, data=body.encode(), headers=signed_headers(secret, body)
    ) as response:
        return response.status, await response.text(), event
