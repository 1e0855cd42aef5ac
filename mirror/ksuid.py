"""Svix message ids: ``msg_`` + a 27-character base62 KSUID whose first 4 bytes are seconds
since 1,400,000,000. The one place that reads or writes them."""

from __future__ import annotations

import functools
import secrets
from datetime import UTC, datetime

EPOCH = 1_400_000_000
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VALUE = {c: i for i, c in enumerate(_BASE62)}
_LENGTH = 27


_REST = 62 ** 20  # what the last 20 characters can add at most (< 2**128)


@functools.lru_cache(maxsize=65536)
def time_of(message_id: str) -> datetime | None:
    """The creation time encoded in a Svix message id, or None when it is not a KSUID."""
    text = message_id.rsplit("_", 1)[-1]
    if len(text) != _LENGTH:
        return None
    head = 0
    for char in text[:7]:
        digit = _VALUE.get(char)
        if digit is None:
            return None
        head = head * 62 + digit
    # The seconds are the top 32 of 160 bits. The first 7 characters decide them unless the
    # rest could carry into them: then read the whole id (rare).
    low = (head * _REST) >> 128
    if ((head * _REST + _REST - 1) >> 128) != low or any(c not in _VALUE for c in text[7:]):
        number = 0
        for char in text:
            digit = _VALUE.get(char)
            if digit is None:
                return None
            number = number * 62 + digit
        low = number >> 128
    if low >= 1 << 32:
        return None
    try:
        return datetime.fromtimestamp(EPOCH + low, tz=UTC)
    except (OverflowError, ValueError, OSError):
        return None


def encode(seconds: int, payload: bytes) -> str:
    """The 27-character base62 KSUID of ``seconds`` (since the epoch above) and a 16-byte
    ``payload``."""
    number = (max(seconds, 0) << 128) | int.from_bytes(payload[:16].rjust(16, b"\0"), "big")
    chars = []
    for _ in range(_LENGTH):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(reversed(chars))


def message_id(at: datetime, payload: bytes | None = None) -> str:
    """A Svix-style message id created at ``at`` (random unless ``payload`` is given)."""
    return "msg_" + encode(int(at.timestamp()) - EPOCH, payload or secrets.token_bytes(16))
