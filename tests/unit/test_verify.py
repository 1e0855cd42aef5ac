"""Svix verification (mirror.verify) on raw bytes, with signatures made by the svix library:
what is authentic passes, everything else is a VerificationFailed with a short reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from mirror.errors import VerificationFailed
from mirror.verify import Verifier
from tests.conftest import OTHER_SECRET, SECRET
from tests.signing import envelope, signed


def fresh() -> tuple[bytes, dict[str, str]]:
    """A delivery signed now (a signature made at import would be stale by the time a long
    test session reaches these tests)."""
    return signed(envelope("order.created", {"id": "ord_1"}))


def refused(headers: dict[str, str], body: bytes,
            secrets: tuple[str, ...] = (SECRET,)) -> str:
    with pytest.raises(VerificationFailed) as caught:
        Verifier(secrets).verify(body, CIMultiDict(headers))
    return str(caught.value)


def test_an_authentic_delivery_gives_its_id_and_signed_time() -> None:
    at = datetime.now(UTC).replace(microsecond=0)
    body, headers = signed(envelope("order.created", {"id": "ord_2"}), at=at)
    delivery = Verifier((SECRET,)).verify(body, CIMultiDict(headers))
    assert delivery.message_id == headers["svix-id"] and delivery.timestamp == at


def test_white_labelled_webhook_headers_and_any_case_are_accepted() -> None:
    body, headers = fresh()
    renamed = {k.replace("svix-", "webhook-").upper(): v for k, v in headers.items()}
    assert Verifier((SECRET,)).verify(body, CIMultiDict(renamed)).message_id == headers["svix-id"]


def test_any_configured_secret_verifies_so_secrets_can_rotate() -> None:
    body, headers = signed(envelope("order.created", {"id": "ord_3"}), secret=OTHER_SECRET)
    assert refused(headers, body) == "no matching signature"
    rotating = Verifier((SECRET, OTHER_SECRET))
    assert rotating.verify(body, CIMultiDict(headers)).message_id == headers["svix-id"]


def test_a_changed_body_is_not_authentic() -> None:
    body, headers = fresh()
    assert refused(headers, body.replace(b"ord_1", b"ord_9")) == "no matching signature"


def test_each_malformed_header_is_named() -> None:
    body, headers = fresh()
    for name in ("svix-id", "svix-timestamp", "svix-signature"):
        without = {k: v for k, v in headers.items() if k != name}
        assert refused(without, body).startswith("missing svix-id")
    assert refused({**headers, "svix-id": "msg with spaces"}, body) == "malformed svix-id header"
    assert refused({**headers, "svix-id": "m" * 256}, body) == "malformed svix-id header"
    # Digits of other scripts would pass float(); only ASCII digits are a timestamp.
    assert refused({**headers, "svix-timestamp": "١٧٠٠٠٠٠٠٠٠"}, body) == \
        "malformed svix-timestamp header"
    assert refused({**headers, "svix-timestamp": "1700000000\n"}, body) == \
        "malformed svix-timestamp header"
    assert refused({**headers, "svix-signature": "v1," + "A" * 5000}, body) == \
        "svix-signature header too long"
    assert refused({**headers, "svix-signature": "v1,!!!not-base64"}, body) == \
        "malformed svix-signature header"


def test_stale_and_future_timestamps_are_refused() -> None:
    now = datetime.now(UTC)
    for shift, reason in ((-6, "timestamp too old"), (6, "timestamp too new")):
        body, headers = signed(envelope("order.created", {"id": "o"}),
                               at=now + timedelta(minutes=shift))
        assert refused(headers, body).startswith(reason)


def test_a_body_that_is_not_utf8_is_refused() -> None:
    body, headers = fresh()
    assert refused(headers, body + b"\xff") == "body is not valid UTF-8"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["svix-id", "svix-timestamp", "svix-signature",
                                        "webhook-id", "webhook-signature"]),
                       st.text(max_size=80)),
       st.binary(max_size=200))
def test_nothing_but_verification_failed_comes_out_of_hostile_input(
        headers: dict[str, str], body: bytes) -> None:
    # Real headers with some replaced by anything, over a body they were not signed for.
    _, real = fresh()
    with pytest.raises(VerificationFailed):
        Verifier((SECRET,)).verify(body, CIMultiDict({**real, **headers}))
