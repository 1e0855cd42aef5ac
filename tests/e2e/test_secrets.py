"""Secrets: the webhook secret, the API token and ``data.access_token`` appear in no log line
(the service's own stderr and stdout, at DEBUG), no table and no response body, whatever
clients send."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import aiohttp
import asyncpg

from tests.conftest import API_TOKEN, SECRET
from tests.e2e.harness import Service, raw_exchange, request_bytes, wait_projected
from tests.signing import envelope, signed

ACCESS_TOKEN = "tok_LIVE_9c1f0e_NEVER_STORED"
OTHER_TOKEN = "rt_REFRESH_77aa_NEVER_STORED"


async def _every_table_as_text(db_url: str) -> str:
    conn = await asyncpg.connect(db_url)
    try:
        tables = [r["t"] for r in await conn.fetch(
            "SELECT quote_ident(tablename) AS t FROM pg_tables WHERE schemaname = 'mirror'")]
        dump = []
        for table in tables:
            dump += [r["row"] for r in await conn.fetch(
                f"SELECT x::text AS row FROM mirror.{table} x")]  # names from the catalog
        dump += [r["b"] for r in await conn.fetch(
            "SELECT convert_from(body, 'UTF8') AS b FROM mirror.events")]
        return "\n".join(dump)
    finally:
        await conn.close()


async def test_secrets_reach_no_log_line_no_table_and_no_response(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service(env={"MIRROR_LOG_LEVEL": "DEBUG"})
    answers: list[str] = []
    created = envelope("connection.created", {"created_date": "2025-01-01T00:00:00Z",
                                              "access_token": ACCESS_TOKEN})
    deliveries = [
        signed(created),
        # The token in places a parser might not expect.
        signed(envelope("order.created", {"id": "ord_1", "status": "open",
                                          "updated_date": "2025-01-01T10:00:00Z",
                                          "integration": {"access_token": ACCESS_TOKEN,
                                                          "refresh_token": OTHER_TOKEN}})),
        signed('{"event_type": "connection.created", "access_token": "' + ACCESS_TOKEN
               + '", "data": {"access_token" : "' + ACCESS_TOKEN + '"}, oops'),
        signed(envelope("connection.created", {"access_token": ACCESS_TOKEN},
                        connection_id="conn_2")),
    ]
    async with aiohttp.ClientSession() as session:
        async def keep(response: aiohttp.ClientResponse) -> int:
            answers.append(f"{dict(response.headers)} {await response.text()}")
            return response.status

        for body, headers in deliveries:
            async with session.post(f"{service.url}/webhooks", data=body,
                                    headers=headers) as r:
                assert await keep(r) == 200
        for body, headers in deliveries:  # retries, and forgeries carrying the token
            async with session.post(f"{service.url}/webhooks", data=body,
                                    headers=headers) as r:
                await keep(r)
            forged = {**headers, "svix-signature": "v1," + base64.b64encode(
                ACCESS_TOKEN.encode()).decode()}
            async with session.post(f"{service.url}/webhooks", data=body, headers=forged) as r:
                assert await keep(r) == 401
        await wait_projected(db_url)
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        for path in ("/objects/connection/conn_1", "/objects/connection/conn_1/history",
                     "/objects/order/ord_1", "/objects/connection/conn_2", "/metrics",
                     "/readyz", "/healthz"):
            async with session.get(f"{service.url}{path}", headers=auth) as r:
                assert await keep(r) == 200, path
        for bad in (API_TOKEN[:-1], SECRET, ACCESS_TOKEN):
            async with session.get(f"{service.url}/objects/connection/conn_1",
                                   headers={"Authorization": f"Bearer {bad}"}) as r:
                assert await keep(r) == 401
    # Malformed requests whose offending bytes are next to a secret: the HTTP parser's error
    # would quote them.
    for raw in (b"GET /objects/order/ord_1 HTTP/1.1\r\nAuthorization: Bearer "
                + API_TOKEN.encode() + b"\x01\r\n\r\n",
                b"POST /webhooks HTTP/1.1\r\nX-Secret: " + SECRET.encode() + b"\x7f\r\n"
                b"Content-Length: x" + ACCESS_TOKEN.encode() + b"\r\n\r\n"):
        status, answer = raw_exchange(service.port, raw)
        assert status == 400
    status, answer = raw_exchange(service.port, request_bytes(
        "GET", "/objects/connection/conn_1", [(b"Authorization", b"Bearer " + API_TOKEN.encode())],
        b""))
    answers.append(answer.decode(errors="replace"))
    assert service.stop() == 0
    logs = service.logs() + service.output()
    assert "delivery refused" in logs and '"level":"debug"' in logs  # the logs were captured
    tables = await asyncio.wait_for(_every_table_as_text(db_url), 30)
    assert "[redacted]" in tables
    key = SECRET.removeprefix("whsec_")
    for secret in (ACCESS_TOKEN, OTHER_TOKEN, SECRET, key, API_TOKEN):
        assert secret not in logs, f"{secret[:8]}… in a log line"
        assert secret not in tables, f"{secret[:8]}… in a table"
        for answer in answers:
            assert secret not in answer, f"{secret[:8]}… in a response: {answer[:300]}"
