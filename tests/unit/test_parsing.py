"""Parsing a delivery into what the log stores (mirror.parsing), without a database: routing,
redaction, and the promise that no authentic body is ever lost or makes it raise."""

from __future__ import annotations

import hashlib
import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror import parsing
from tests.signing import envelope


def body(event: object) -> bytes:
    return orjson.dumps(event)


def test_a_usable_order_is_routed_keyed_and_stored_as_sent() -> None:
    raw = body(envelope("Order.Created", {"id": "ord_1", "status": "open"}))
    parsed = parsing.parse(raw)
    assert parsed.unusable_reason is None
    assert (parsed.resource, parsed.object_id, parsed.connection_id) == ("order", "ord_1",
                                                                          "conn_1")
    assert parsed.event_type == "Order.Created" and parsed.kind == "order.created"
    assert parsed.body == raw and not parsed.redacted
    assert parsed.body_sha256 == hashlib.sha256(raw).digest()
    assert parsing.loads(parsed.data or "") == {"id": "ord_1", "status": "open"}


def test_credentials_are_redacted_wherever_they_are_and_the_digest_is_of_the_original() -> None:
    raw = body(envelope("connection.created", {"created_date": "2025-01-01T00:00:00Z",
                                               "nested": [{"Access_Token": "tok-123"}]},
                        api_key="key-456"))
    parsed = parsing.parse(raw)
    assert parsed.redacted and parsed.unusable_reason is None
    assert b"tok-123" not in parsed.body and b"key-456" not in parsed.body
    assert "tok-123" not in (parsed.data or "")
    assert parsing.loads(parsed.body)["api_key"] == parsing.REDACTED
    assert parsed.body_sha256 == hashlib.sha256(raw).digest()


def test_a_body_that_is_not_json_is_kept_with_credentials_redacted_as_text() -> None:
    raw = b'{"event_type": "order.created", "access_token": "tok-9", oops'
    parsed = parsing.parse(raw)
    assert parsed.unusable_reason == "body is not valid JSON"
    assert b"tok-9" not in parsed.body and parsed.redacted
    assert b"oops" in parsed.body


def test_a_credential_that_text_redaction_cannot_reach_withholds_the_body() -> None:
    # An escaped key in a body that is not JSON: its value cannot be found reliably as text.
    raw = b'{"\\u0061ccess_token": "tok-7", broken'
    parsed = parsing.parse(raw)
    assert parsed.body == parsing.WITHHELD and parsed.redacted
    assert parsed.body_sha256 == hashlib.sha256(raw).digest()


def test_each_unusable_body_says_why() -> None:
    cases = {
        b"[1, 2]": "body is not a JSON object",
        body({"data": {"id": "x"}}): "missing or invalid event_type",
        body(envelope("inventory_ledger.created", {"id": "x"})): "unknown event_type",
        body({"event_type": "order.created", "data": {"id": "x"}}): "missing connection_id",
        body(envelope("order.created", {"status": "open"})): "missing object key",
        body(envelope("order.created", ["not", "an", "object"])): "missing or invalid data",
        body(envelope("order.updated", {"id": "x"}, previous=[1])):
            "previous_attributes is not an object",
        body(envelope("order.updated", {"id": "x"}, data_truncated=True)): "data truncated",
        b'{"event_type": "order.created", "data": {"id": "a\\u0000b"}}':
            "body cannot be stored as JSON: string contains a NUL character",
        b'{"event_type": "order.created", "data": {"id": "x", "n": 1e999}}':
            "body cannot be stored as JSON: number out of range",
        b"[" * 100 + b"]" * 100: "body cannot be stored as JSON: nested deeper than 64 levels",
    }
    for raw, reason in cases.items():
        parsed = parsing.parse(raw)
        assert parsed.unusable_reason is not None and parsed.unusable_reason.startswith(reason), \
            (raw[:60], parsed.unusable_reason)
        assert parsed.body_sha256 == hashlib.sha256(raw).digest()


def test_integers_beyond_64_bits_keep_every_digit() -> None:
    big = 2**70 + 1
    raw = b'{"event_type": "order.created", "connection_id": "c", "data": {"id": "x", "n": ' \
        + str(big).encode() + b"}}"
    parsed = parsing.parse(raw)
    assert parsed.unusable_reason is None
    assert parsing.loads(parsed.data or "")["n"] == big
    assert parsing.loads(parsing.dumps({"n": big})) == {"n": big}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_no_body_makes_parsing_raise_and_every_body_is_kept(raw: bytes) -> None:
    parsed = parsing.parse(raw)
    assert parsed.body_sha256 == hashlib.sha256(raw).digest()
    assert parsed.redacted or parsed.body == raw  # kept as sent unless a credential was cut
    if parsed.unusable_reason is None:
        assert parsed.resource is not None and parsed.object_id is not None
