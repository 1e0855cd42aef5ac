"""Request parameters of the read API and the explorer, checked before they reach the database.

Every function returns the value the database may take as a bound parameter, or raises
BadRequest (UnknownResource for a resource name the registry does not know).
"""

from __future__ import annotations

from datetime import datetime

from mirror.errors import BadRequest, UnknownResource
from projections import registry
from projections.base import parse_time


def text(value: str, name: str, max_length: int) -> str:
    """``value`` if the database can take it as text: not empty, not too long, no NUL, no
    unpaired surrogate."""
    if not value or len(value) > max_length or "\x00" in value:
        raise BadRequest(f"bad {name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"bad {name}") from None
    return value


def resource(name: str) -> str:
    """The registry's name of a resource (``inbound-shipment`` is ``inbound_shipment``)."""
    found = registry.by_name(name)
    if found is None:
        raise UnknownResource(name)
    return found.name


def time(raw: str | None, name: str) -> datetime | None:
    """An ISO 8601 time; None when absent or empty."""
    if raw is None or raw == "":
        return None
    parsed = parse_time(raw)
    if parsed is None:
        raise BadRequest(f"{name} must be an ISO 8601 time, got {raw[:64]!r}")
    return parsed


def limit(raw: str | None, default: int, maximum: int) -> int:
    """A whole number from 1 to ``maximum``; ``default`` when absent or empty."""
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"limit must be a whole number from 1 to {maximum}")
    return int(raw)
