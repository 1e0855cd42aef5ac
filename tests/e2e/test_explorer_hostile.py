"""The explorer's endpoints against fuzzed raw requests on the real service: whatever the
parameters' bytes (invalid UTF-8, NUL, quotes, SQL, very long), never a 5xx and nothing
written."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_TOKEN
from tests.e2e.harness import Service, fetch, raw_exchange, request_bytes, wait_projected
from tests.signing import envelope, signed

ENDPOINTS = ["/explore/search", "/explore/timeline", "/explore/state", "/explore/overview",
             "/explore/resources", "/ui/", "/ui/app.js"]
PARAMETERS = ["q", "resource", "id", "connection_id", "at", "known_at", "before", "limit"]
SQLISH = ["'", '"', "--", ";", "' OR '1'='1", "'; DROP TABLE mirror.events; --", "%", "_",
          "$1", "\\", "\x00", "ord_1", "order", "#", "2025-05-01T10:00:00Z", "1000", "0"]
_value = st.one_of(
    st.sampled_from(SQLISH),
    st.text(max_size=40),
    st.binary(max_size=40),  # raw bytes, percent-encoded: invalid UTF-8 too
    st.integers(min_value=0, max_value=20_000).map(lambda n: "x" * n),
)


@st.composite
def explore_requests(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(ENDPOINTS))
    params = draw(st.dictionaries(st.sampled_from(PARAMETERS), _value, max_size=5))
    query = "&".join(
        f"{k}={quote(v if isinstance(v, bytes) else v.encode('utf-8', 'surrogatepass'), safe='')}"
        for k, v in params.items())
    token = draw(st.sampled_from([API_TOKEN.encode(), b"", b"wrong", API_TOKEN.encode() + b"x"]))
    target = path + (f"?{query}" if query else "")
    return request_bytes("GET", target, [(b"Authorization", b"Bearer " + token)], b"")


def test_fuzzed_explorer_requests_never_get_a_5xx(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    body, headers = signed(envelope("order.created", {
        "id": "ord_1", "status": "open", "order_number": "#1",
        "updated_date": "2025-05-01T10:00:00Z"}))
    status, _ = raw_exchange(service.port, request_bytes(
        "POST", "/webhooks", [(k.encode(), v.encode()) for k, v in headers.items()], body))
    assert status == 200
    asyncio.run(wait_projected(db_url))
    seen: set[int | None] = set()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(request=explore_requests())
    def get(request: bytes) -> None:
        status, answer = raw_exchange(service.port, request)
        seen.add(status)
        assert status is not None and status < 500, answer[:400]

    get()
    assert {200, 400, 401} <= seen
    counts = asyncio.run(fetch(db_url, "SELECT (SELECT count(*) FROM mirror.events) AS events, "
                                       "(SELECT count(*) FROM mirror.orders) AS orders"))
    assert (counts[0]["events"], counts[0]["orders"]) == (1, 1)
