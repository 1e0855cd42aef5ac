"""Parse an authentic delivery into what the log stores, redacting credentials first.

Nothing here raises on any body: an authentic body that is not a usable Trackstar envelope
becomes an ``Parsed`` with ``unusable_reason`` set, so it is stored and never lost.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from projections import registry
from projections.base import MAX_KEY_BYTES, normalise_kind

REDACTED = "[redacted]"
# Keys whose values are credentials wherever they appear in a payload.
CREDENTIAL_KEYS = frozenset({
    "access_token", "refresh_token", "api_key", "x-trackstar-api-key",
    "x-trackstar-access-token", "client_secret", "password",
})
_CREDENTIAL_TEXT = re.compile(
    r'("(?:' + "|".join(re.escape(k) for k in sorted(CREDENTIAL_KEYS)) + r')"\s*:\s*)'
    r'"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)
MAX_DEPTH = 64



@dataclass(frozen=True)
class Parsed:
    """One delivery as the log stores it."""

    body: bytes                      # stored body: the raw bytes, or a redacted rendering
    body_sha256: bytes               # of the body exactly as received
    redacted: bool
    connection_id: str | None = None
    integration_name: str | None = None
    integration_type: str | None = None
    event_type: str | None = None
    kind: str | None = None
    resource: str | None = None
    object_id: str | None = None
    data: str | None = None                  # JSON text, safe for jsonb
    previous_attributes: str | None = None   # JSON text, safe for jsonb
    unusable_reason: str | None = None


class _Unsafe(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads(text: bytes | str) -> Any:
    """Parse JSON text exactly: integers beyond 64 bits stay integers."""
    return _loads(text)[0]


# orjson reads an integer beyond 64 bits as a float (losing digits); a run of 20 digits is the
# cheap sign that the exact (slower) standard library parser is needed.
_LONG_DIGITS = re.compile(rb"\d{20,}")


def _loads(text: bytes | str) -> tuple[Any, bool]:
    """The parsed value, and whether orjson (which never yields NaN or infinities) parsed it."""
    raw = text.encode() if isinstance(text, str) else text
    if not _LONG_DIGITS.search(raw):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass  # e.g. 1e999, which the standard library reads as infinity
    return json.loads(raw, parse_constant=_reject_constant), False


# What can make a parsed body unsafe to store, or hold a credential, always shows in its
# bytes: an escape (\u0000, a lone surrogate, an escaped key), deep nesting (many brackets)
# or a credential key's name. Bodies without any of them skip the walk in _scrub.
_CREDENTIAL_BYTES = tuple(f'"{key}"'.encode() for key in sorted(CREDENTIAL_KEYS))


def _may_need_scrub(raw: bytes) -> bool:
    if b"\\u" in raw or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        return True
    lowered = raw.lower()
    return any(key in lowered for key in _CREDENTIAL_BYTES)


def _scrub(value: Any, depth: int = 0) -> tuple[Any, bool]:
    """Copy of ``value`` with credentials redacted; raise _Unsafe if jsonb cannot hold it."""
    if depth > MAX_DEPTH:
        raise _Unsafe(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise _Unsafe("string contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Unsafe("string contains an unpaired surrogate") from None
        return value, False
    if isinstance(value, dict):
        changed = False
        out: dict[str, Any] = {}
        for key, item in value.items():
            _scrub(key, depth + 1)
            if key.lower() in CREDENTIAL_KEYS and item is not None:
                out[key] = REDACTED
                changed = True
            else:
                out[key], sub = _scrub(item, depth + 1)
                changed = changed or sub
        return out, changed
    if isinstance(value, list):
        changed = False
        items = []
        for item in value:
            new, sub = _scrub(item, depth + 1)
            items.append(new)
            changed = changed or sub
        return items, changed
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as infinity
        raise _Unsafe("number out of range")
    return value, False


def dumps(value: Any) -> str:
    """Compact JSON text of ``value`` (integers beyond 64 bits too)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, ensure_ascii=False, allow_nan=False)


_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
WITHHELD = (b"[body withheld: it could not be parsed and names a credential "
            b"the mirror could not redact]")


def _as_text(raw: bytes, digest: bytes, reason: str) -> Parsed:
    """A body kept whole, credentials redacted in its text, flagged with ``reason``.

    Text redaction only understands ``"key": "string"``; if a credential's name shows up
    anywhere else (a non-string value, an escaped key), the body is withheld instead and
    only its sha256 kept: a credential in a table is worse than a body we cannot show."""
    text = raw.decode("utf-8", errors="replace")
    redacted_text, count = _CREDENTIAL_TEXT.subn(rf'\1"{REDACTED}"', text)
    decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text).lower()
    if sum(decoded.count(key) for key in CREDENTIAL_KEYS) > count:
        return Parsed(WITHHELD, digest, True, unusable_reason=reason)
    return Parsed(redacted_text.encode() if count else raw, digest, bool(count),
                    unusable_reason=reason)


def parse(raw: bytes) -> Parsed:
    """Parse and redact one authentic body. Never raises: a body that cannot be used is kept
    (credentials redacted as text) with the reason, never answered with an error and lost."""
    digest = hashlib.sha256(raw).digest()
    try:
        return _parse(raw, digest)
    except Exception as exc:  # a last resort; every known case is handled in _parse
        return _as_text(raw, digest, f"body could not be parsed: {type(exc).__name__}")


def _parse(raw: bytes, digest: bytes) -> Parsed:
    try:
        doc, by_orjson = _loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return _as_text(raw, digest, "body is not valid JSON")
    try:
        if by_orjson and not _may_need_scrub(raw):
            clean, changed = doc, False
        else:
            clean, changed = _scrub(doc)
    except (_Unsafe, RecursionError) as exc:
        return _as_text(raw, digest, f"body cannot be stored as JSON: {exc}")
    body = dumps(clean).encode() if changed else raw
    base = Parsed(body, digest, changed)
    if not isinstance(clean, dict):
        return _with(base, unusable_reason="body is not a JSON object")

    def text_field(name: str) -> str | None:
        value = clean.get(name)
        return value if isinstance(value, str) and len(value.encode()) <= MAX_KEY_BYTES else None

    event_type = text_field("event_type")
    data = clean.get("data")
    previous = clean.get("previous_attributes")
    fields = dict(
        connection_id=text_field("connection_id"),
        integration_name=text_field("integration_name"),
        integration_type=text_field("integration_type"),
        event_type=event_type,
        kind=normalise_kind(event_type) if event_type else None,
        data=dumps(data) if isinstance(data, dict) else None,
        previous_attributes=dumps(previous) if isinstance(previous, dict) else None,
    )
    if event_type is None:
        return _with(base, **fields, unusable_reason="missing or invalid event_type")
    resource = registry.for_event(event_type)
    if resource is None:
        return _with(base, **fields, unusable_reason="unknown event_type")
    fields["resource"] = resource.name
    if fields["connection_id"] is None:
        return _with(base, **fields, unusable_reason="missing connection_id")
    if not isinstance(data, dict):
        return _with(base, **fields, unusable_reason="missing or invalid data")
    if previous is not None and not isinstance(previous, dict):
        return _with(base, **fields, unusable_reason="previous_attributes is not an object")
    object_id = resource.object_key(clean)
    fields["object_id"] = object_id
    if object_id is None:
        return _with(base, **fields, unusable_reason=f"missing object key ({resource.key}), "
                                                     f"or one over {MAX_KEY_BYTES} bytes")
    if clean.get("data_truncated") is True:
        return _with(base, **fields, unusable_reason="data truncated")
    return _with(base, **fields)


def _with(base: Parsed, **fields: Any) -> Parsed:
    return Parsed(base.body, base.body_sha256, base.redacted, **fields)
