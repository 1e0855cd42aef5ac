"""The svix-id time: read exactly (it breaks ties between states at one instant)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from mirror import ksuid

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def full_decode(text: str) -> datetime | None:
    number = 0
    for char in text:
        number = number * 62 + ALPHABET.index(char)
    if number >= 1 << 160:
        return None
    return datetime.fromtimestamp(ksuid.EPOCH + (number >> 128), tz=UTC)


@given(st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=16))
def test_the_time_written_is_the_time_read(seconds: int, payload: bytes) -> None:
    msg = "msg_" + ksuid.encode(seconds, payload)
    assert ksuid.time_of.__wrapped__(msg) == datetime.fromtimestamp(ksuid.EPOCH + seconds, UTC)


@given(st.text(ALPHABET, min_size=27, max_size=27))
def test_any_27_characters_read_as_a_full_decode_does(text: str) -> None:
    assert ksuid.time_of.__wrapped__("msg_" + text) == full_decode(text)


def test_what_is_not_a_ksuid_has_no_time() -> None:
    for bad in ("msg_short", "backfill_x1", "msg_" + "!" * 27, "msg_" + "z" * 27):
        assert ksuid.time_of.__wrapped__(bad) is None
