"""Hostile input against the real service (a subprocess on a real socket, a real PostgreSQL).

Promise: no request content gets a 5xx; nothing unauthenticated is stored; a captured request
replayed after 5 minutes is refused; any number of deliveries of one event give one row; slow
clients and oversized requests are cut off by timeouts and limits; and a flood of
unauthenticated requests slows authentic ones by a bounded factor only.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.sample import message_id
from tests.conftest import API_TOKEN, OTHER_SECRET, SECRET
from tests.e2e.harness import Service, fetch, raw_exchange, request_bytes, status_of
from tests.signing import envelope, signed

FUZZ_EXAMPLES = 300


def order(object_id: str, note: str = "") -> dict[str, Any]:
    return envelope("order.created", {"id": object_id, "status": "open", "note": note,
                                      "updated_date": "2025-09-01T10:00:00Z"})


def header_pairs(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def stored_ids(db_url: str) -> set[str]:
    return {r["event_id"] for r in await fetch(db_url, "SELECT event_id FROM mirror.events")}


def healthy(service: Service) -> bool:
    status, _ = raw_exchange(service.port, request_bytes("GET", "/healthz", [], b""))
    return status == 200


# ------------------------------------------------------------------------------------------
# Property-based fuzzing: headers and bodies, byte for byte.
# ------------------------------------------------------------------------------------------

def _manual_signature(secret: str, msg_id: str, ts: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


_header_bytes = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"", b" ", b"v1,", b"v1,AAAA", b"v2,abc", b"v1,=", b"v1 v1,,",
                     b"0", b"-1", b"99999999999999999999", b"1e9", b"\xd9\xa1\xd9\xa7",
                     b"msg_" + b"A" * 300, b"%00", b"\\x00"]),
)
_body_bytes = st.one_of(
    st.binary(max_size=600),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"event_type": 1}', b"\xff\xfe",
                     b'{"data": {"id": 1e999, "n": 123456789012345678901234567890}}',
                     b'{"event_type": "order.created", "data": ' + b"[" * 5000 + b"]" * 5000
                     + b"}"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                 | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=20).map(lambda doc: json.dumps(
                     {"connection_id": "conn_f", "event_type": "order.updated",
                      "data": {"id": "fz", "x": doc}, "previous_attributes": {"x": doc}},
                     ensure_ascii=False).encode()),
)
_names = st.sampled_from([b"svix-id", b"svix-timestamp", b"svix-signature", b"webhook-id",
                          b"webhook-timestamp", b"webhook-signature", b"Content-Type",
                          b"Transfer-Encoding", b"Content-Encoding", b"Expect", b"X-Other"])


@dataclass(frozen=True)
class Fuzzed:
    """One fuzzed request to POST /webhooks and what was signed for it."""

    request: bytes
    msg_id: str
    signed_sha256: bytes | None  # of the body signed with the endpoint's secret, if it was
    must_store: bool             # untouched, fresh and signed with the secret: must get 200


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def deliveries(draw: st.DrawFn) -> Fuzzed:
    """A signed delivery (with the endpoint's secret or another, fresh or not), then maybe
    mutated: a header dropped, replaced, added, renamed, or the body swapped."""
    signed_body = body = draw(_body_bytes)
    msg_id = message_id()
    ts = str(int(time.time()) + draw(st.sampled_from([0, 0, 0, -100, 100, -400, 400])))
    secret = draw(st.sampled_from([SECRET, SECRET, OTHER_SECRET]))
    headers = [(b"svix-id", msg_id.encode()), (b"svix-timestamp", ts.encode()),
               (b"svix-signature", _manual_signature(secret, msg_id, ts, body).encode())]
    untouched = True
    mutation = draw(st.sampled_from(["none", "drop", "replace", "add", "body", "rename"]))
    if mutation == "drop":
        del headers[draw(st.integers(0, 2))]
        untouched = False
    elif mutation == "replace":
        index = draw(st.integers(0, 2))
        headers[index] = (headers[index][0], draw(_header_bytes))
        untouched = False
    elif mutation == "add":
        headers.insert(draw(st.integers(0, 3)), (draw(_names), draw(_header_bytes)))
        untouched = False
    elif mutation == "body":
        body = draw(_body_bytes)
        untouched = signed_body == body
    elif mutation == "rename":
        headers = [(name.replace(b"svix-", b"webhook-"), value) for name, value in headers]
    fresh = abs(int(ts) - time.time()) < 290
    return Fuzzed(request_bytes("POST", "/webhooks", headers, body), msg_id,
                  hashlib.sha256(signed_body).digest() if secret == SECRET else None,
                  untouched and fresh and secret == SECRET and _is_utf8(body))


def test_fuzzed_headers_and_bodies_never_get_a_5xx_nor_store_anything_unauthenticated(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    signed_bodies: dict[str, bytes] = {}   # svix-id -> sha256 of the body signed with SECRET
    statuses: list[int | None] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(delivery=deliveries())
    def post(delivery: Fuzzed) -> None:
        if delivery.signed_sha256 is not None:
            signed_bodies[delivery.msg_id] = delivery.signed_sha256
        status, answer = raw_exchange(service.port, delivery.request)
        statuses.append(status)
        assert status is not None and status < 500, answer[:400]
        if delivery.must_store:
            assert status == 200, answer[:400]

    post()
    rows = asyncio.run(fetch(db_url, "SELECT event_id, body_sha256 FROM mirror.events"))
    # Everything stored is exactly the bytes some request signed with the endpoint's secret.
    for row in rows:
        assert signed_bodies.get(row["event_id"]) == bytes(row["body_sha256"]), row["event_id"]
    assert healthy(service)
    assert len(rows) > 10 and statuses.count(401) > 10  # the fuzz reached both sides


_path_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["x'; DROP TABLE mirror.events; --", "%", "_", "ord%", "*", "\\",
                     "' OR '1'='1", "\x00", "\ud800", "ордер", "🧨", "a" * 5000,
                     "order", "inbound-shipment", "Inventory", "../../etc/passwd"]),
)


@st.composite
def read_requests(draw: st.DrawFn) -> bytes:
    """A raw GET of the read API with fuzzed resource, id, parameters and token."""
    resource = quote(draw(_path_text).encode("utf-8", "surrogatepass"), safe="")
    object_id = quote(draw(_path_text).encode("utf-8", "surrogatepass"), safe="")
    suffix = draw(st.sampled_from(["", "/history"]))
    params = draw(st.dictionaries(st.sampled_from(["at", "known_at", "connection_id"]),
                                  _path_text, max_size=3))
    query = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}"
                     for k, v in params.items())
    token = draw(st.one_of(st.just(API_TOKEN.encode()), _header_bytes))
    path = f"/objects/{resource}/{object_id}{suffix}" + (f"?{query}" if query else "")
    return request_bytes("GET", path, [(b"Authorization", b"Bearer " + token)], b"")


def test_fuzzed_read_api_requests_never_get_a_5xx(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    body, headers = signed(order("ord_1"))
    status, _ = raw_exchange(service.port, request_bytes("POST", "/webhooks",
                                                         header_pairs(headers), body))
    assert status == 200
    seen: set[int | None] = set()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(request=read_requests())
    def get(request: bytes) -> None:
        status, answer = raw_exchange(service.port, request)
        seen.add(status)
        assert status is not None and status < 500, answer[:400]

    get()
    assert {400, 401} <= seen
    assert [r["n"] for r in asyncio.run(fetch(db_url, "SELECT count(*) AS n FROM mirror.events"
                                                      ))] == [1]


def test_inputs_the_fuzzer_found_get_a_4xx_or_are_kept(
        start_service: Callable[..., Service], db_url: str) -> None:
    """Regressions: each of these once got a 500."""
    service = start_service()
    token = API_TOKEN.encode()
    for raw, expected in [
        # An Expect header aiohttp's own handler could not quote back.
        (request_bytes("POST", "/webhooks", [(b"Expect", b"\x80")], b"{}"), 417),
        (request_bytes("GET", "/healthz", [(b"Expect", b"!")], b""), 417),
        # A bearer token that is not UTF-8.
        (request_bytes("GET", "/objects/order/x", [(b"Authorization", b"Bearer \xff\xfe")],
                       b""), 401),
        # A connection_id PostgreSQL cannot hold as text.
        (request_bytes("GET", "/objects/order/x?connection_id=%00",
                       [(b"Authorization", b"Bearer " + token)], b""), 400),
    ]:
        status, answer = raw_exchange(service.port, raw)
        assert status == expected, answer[:300]
    # An authentic body whose numbers the envelope parser could not re-serialise (an
    # out-of-range float next to an integer beyond 64 bits): kept byte for byte, flagged.
    body = (b'{"connection_id": "c", "event_type": "order.created", "access_token": "tok_X1",'
            b' "data": {"id": "x", "a": 1e999, "b": 123456789012345678901234567890}}')
    body, headers = signed(body)
    status, answer = raw_exchange(service.port, request_bytes("POST", "/webhooks",
                                                              header_pairs(headers), body))
    assert status == 200 and b"not projectable" in answer, answer[-300:]
    rows = asyncio.run(fetch(db_url, "SELECT body, body_sha256, unusable_reason "
                                     "FROM mirror.events"))
    assert len(rows) == 1 and rows[0]["unusable_reason"]
    assert bytes(rows[0]["body_sha256"]) == hashlib.sha256(body).digest()
    assert b"tok_X1" not in bytes(rows[0]["body"])
    # A compressed body is taken as sent: the signature is over other bytes.
    plain, headers = signed(order("ord_gz"))
    status, _ = raw_exchange(service.port, request_bytes(
        "POST", "/webhooks", [*header_pairs(headers), (b"Content-Encoding", b"gzip")],
        gzip.compress(plain)))
    assert status == 401
    assert healthy(service)


# ------------------------------------------------------------------------------------------
# Limits and timeouts.
# ------------------------------------------------------------------------------------------

def test_oversized_headers_and_request_lines_are_refused(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    body, headers = signed(order("ord_big"))
    pairs = header_pairs(headers)
    cases = {
        "one huge header": [*pairs, (b"X-Padding", b"a" * 100_000)],
        "a huge svix-signature": [*pairs[:2], (b"svix-signature", b"v1,A" * 30_000)],
        "too many headers": [*pairs, *[(f"X-H{i}".encode(), b"v") for i in range(200)]],
    }
    for label, case in cases.items():
        status, answer = raw_exchange(service.port, request_bytes("POST", "/webhooks", case,
                                                                  body))
        assert status is not None and 400 <= status < 500, (label, answer[:300])
    status, _ = raw_exchange(service.port, request_bytes(
        "POST", "/webhooks?" + "q" * 20_000, pairs, body))
    assert status is not None and 400 <= status < 500
    # Just under the limits an honest request still gets through.
    near = [*pairs, (b"X-Padding", b"a" * 8000)]
    assert raw_exchange(service.port, request_bytes("POST", "/webhooks", near, body))[0] == 200
    assert asyncio.run(stored_ids(db_url)) == {headers["svix-id"]}


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed (or reset) the connection."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
    if not data:
        return True
    return _closed_by_server(sock)  # an answer (408/400) before the close: read on


def test_body_arriving_in_pieces_within_the_timeout_is_accepted(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    body, headers = signed(order("ord_pieces", note="n" * 3000))
    request = request_bytes("POST", "/webhooks", header_pairs(headers), body)
    cut = len(request) - len(body) // 2
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(request[:cut])
        time.sleep(0.5)
        sock.sendall(request[cut:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert status_of(answer) == 200, answer
    assert asyncio.run(stored_ids(db_url)) == {headers["svix-id"]}


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_do_not_block_others(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service(env={"MIRROR_REQUEST_TIMEOUT": "2"})
    body, headers = signed(order("ord_slow"))
    full = request_bytes("POST", "/webhooks", header_pairs(headers), body)
    head_end = full.index(b"\r\n\r\n") + 4
    # 30 clients trickle their headers, 10 trickle their body, a byte every 0.2 s: each would
    # need a minute or more to finish.
    header_tricklers = [(_open(service.port), full[:head_end], 0) for _ in range(30)]
    body_tricklers = []
    for _ in range(10):
        sock = _open(service.port)
        sock.sendall(full[:head_end])
        body_tricklers.append((sock, full[head_end:], 0))
    pending = {id(s): (s, data, sent) for s, data, sent in header_tricklers + body_tricklers}
    honest = None
    deadline = time.monotonic() + 30
    cut_off = 0
    while pending and time.monotonic() < deadline:
        for key, (sock, data, sent) in list(pending.items()):
            if _closed_by_server(sock):
                sock.close()
                del pending[key]
                cut_off += 1
                continue
            try:
                sock.send(data[sent : sent + 1])
            except OSError:
                sock.close()
                del pending[key]
                cut_off += 1
                continue
            assert sent + 1 < len(data), "a trickling client finished: nothing cut it off"
            pending[key] = (sock, data, sent + 1)
        if honest is None:  # while they trickle, an honest delivery goes through
            other_body, other_headers = signed(order("ord_honest"))
            honest = raw_exchange(service.port, request_bytes(
                "POST", "/webhooks", header_pairs(other_headers), other_body))[0]
        time.sleep(0.2)
    for sock, _, _ in pending.values():
        sock.close()
    assert not pending, f"{len(pending)} slow clients were never cut off"
    assert cut_off == 40
    assert honest == 200
    assert [r["object_id"] for r in asyncio.run(fetch(
        db_url, "SELECT object_id FROM mirror.events"))] == ["ord_honest"]
    assert healthy(service)


# ------------------------------------------------------------------------------------------
# Replays and duplicates.
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_captured_request_replayed_after_five_minutes_is_refused(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    # Captured 4 min 55 s after it was signed, i.e. just inside Svix's 5-minute window...
    signed_at = datetime.now(UTC) - timedelta(seconds=295)
    body, headers = signed(order("ord_replay"), at=signed_at)
    captured = request_bytes("POST", "/webhooks", header_pairs(headers), body)
    status, answer = raw_exchange(service.port, captured)
    assert status == 200 and b'"stored"' in answer
    status, answer = raw_exchange(service.port, captured)  # replayed at once: a duplicate
    assert status == 200 and b'"duplicate"' in answer
    # ... and replayed again once the window has passed (a few seconds later).
    while datetime.now(UTC) < signed_at + timedelta(seconds=302):
        time.sleep(0.2)
    status, answer = raw_exchange(service.port, captured)
    assert status == 401 and b"too old" in answer
    # The same signature on another event, or on another body, never verifies.
    other_body, _ = signed(order("ord_other"))
    for forged in (request_bytes("POST", "/webhooks", header_pairs(
            {**headers, "svix-id": message_id()}), body),
                   request_bytes("POST", "/webhooks", header_pairs(headers), other_body)):
        assert raw_exchange(service.port, forged)[0] == 401
    rows = asyncio.run(fetch(db_url, "SELECT event_id FROM mirror.events"))
    assert [r["event_id"] for r in rows] == [headers["svix-id"]]


@pytest.mark.slow
async def test_ten_thousand_deliveries_of_one_event_give_one_row(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    event = order("ord_many")
    msg_id = message_id()
    deliveries = 10_000
    answers: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(deliveries):
        queue.put_nowait(n)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            # Svix re-signs every attempt: same id and body, timestamps within the window.
            body, headers = signed(event, msg_id=msg_id,
                                   at=datetime.now(UTC) - timedelta(seconds=n % 240))
            async with session.post(f"{service.url}/webhooks", data=body,
                                    headers=headers) as response:
                key = f"{response.status} {(await response.json()).get('status')}"
                answers[key] = answers.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(session) for _ in range(32)))
        async with session.get(f"{service.url}/metrics") as response:
            metrics = await response.text()
    assert answers == {"200 stored": 1, "200 duplicate": deliveries - 1}
    rows = await fetch(db_url, "SELECT event_id FROM mirror.events")
    assert [r["event_id"] for r in rows] == [msg_id]
    assert f"mirror_duplicate_deliveries_total {deliveries - 1}.0" in metrics


# ------------------------------------------------------------------------------------------
# A flood of unauthenticated requests.
# ------------------------------------------------------------------------------------------

FLOOD_CONNECTIONS = 16
SAMPLES = 200
BOUND = 10.0


async def _latencies(service: Service, prefix: str) -> list[float]:
    """SAMPLES authentic deliveries one after another; the seconds each took."""
    out = []
    async with aiohttp.ClientSession() as session:
        for n in range(SAMPLES):
            body, headers = signed(order(f"{prefix}_{n}"))
            started = time.perf_counter()
            async with session.post(f"{service.url}/webhooks", data=body,
                                    headers=headers) as response:
                await response.read()
                assert response.status == 200
            out.append(time.perf_counter() - started)
    return out


@pytest.mark.slow
async def test_flood_of_unauthenticated_requests_slows_authentic_ones_by_a_bounded_factor(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    await _latencies(service, "warm")
    calm = await _latencies(service, "calm")
    with subprocess.Popen([sys.executable, "-m", "tests.e2e.flood", f"{service.url}/webhooks",
                           str(FLOOD_CONNECTIONS)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as flooder:
        assert flooder.stdin is not None and flooder.stdout is not None
        try:
            assert (await asyncio.to_thread(flooder.stdout.readline)).strip() == "ready"
            flooded = await _latencies(service, "flooded")
        finally:
            flooder.stdin.close()  # the flooder stops and reports
            out = await asyncio.to_thread(flooder.stdout.read)
            flooder.wait(timeout=60)
    summary = json.loads(out.strip().splitlines()[-1])
    factor = statistics.median(flooded) / statistics.median(calm)
    print(f"\nflood: {FLOOD_CONNECTIONS} connections, {summary['rate']} forged requests/s, "
          f"answers {summary['statuses']}; authentic p50 {statistics.median(calm) * 1000:.1f} "
          f"ms calm, {statistics.median(flooded) * 1000:.1f} ms flooded: factor {factor:.2f}")
    assert set(summary["statuses"]) == {"401"}, "a forged request got something else than 401"
    assert factor < BOUND
    stored = await fetch(db_url, "SELECT count(*) AS n, "
                                 "count(*) FILTER (WHERE connection_id = 'conn_flood') AS f "
                                 "FROM mirror.events")
    assert (stored[0]["n"], stored[0]["f"]) == (3 * SAMPLES, 0)
