"""Several database hosts and a read replica, against a real PostgreSQL.

The failover itself (a real primary, synchronous standby and hot standby) is in
tests/e2e/test_failover.py; these tests cover what one server can show: a dead host in the
list is passed over, /readyz says why no host will do, reads go to the read URL and fall back
to the primary while it is unreachable, and nothing can write through a read connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import create_app
from mirror.db import Reader, create_pool, init_connection
from tests.conftest import API_TOKEN, fresh_database, make_settings
from tests.e2e.harness import free_port
from tests.logtools import append, project_all
from tests.signing import envelope, signed

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
ORDER = envelope("order.created", {"id": "ord_ha", "status": "open",
                                   "updated_date": "2025-03-01T10:00:00Z"})


def dead_host_first(url: str) -> str:
    """``url`` with a host where nothing listens put in front of its own host."""
    parts = urlsplit(url)
    user, at, authority = parts.netloc.rpartition("@")
    if authority:
        return urlunsplit(parts._replace(
            netloc=f"{user}{at}127.0.0.1:{free_port()},{authority}"))
    query = [(k, f"/nonexistent/mirror-dead-host,{v}" if k == "host" else v)
             for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def nowhere() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"


@pytest.fixture
def replica_url(server_url: str, template_db: str) -> Iterator[str]:
    """A second database standing in for a read replica that holds what the primary lacks."""
    with fresh_database(server_url, template_db) as url:
        yield url


async def _fill(url: str) -> None:
    conn = await asyncpg.connect(url)
    await init_connection(conn)
    try:
        await append(conn, ORDER)
        await project_all(conn)
    finally:
        await conn.close()


@pytest.fixture
async def client_with(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    clients: list[TestClient[object, object]] = []

    async def start(**settings: object) -> TestClient[object, object]:
        app = create_app(make_settings(**settings))  # type: ignore[arg-type]
        client: TestClient[object, object] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def test_a_dead_host_before_the_primary_is_passed_over(db_url: str,
                                                             client_with: object) -> None:
    client = await client_with(db_url=dead_host_first(db_url), db_timeout=2.0)  # type: ignore[operator]
    body, headers = signed(ORDER)
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 200, await response.text()
    rows = await asyncpg.connect(db_url)
    try:
        assert await rows.fetchval("SELECT count(*) FROM mirror.events") == 1
    finally:
        await rows.close()


async def test_readyz_says_why_when_no_host_will_do(client_with: object) -> None:
    a, b = free_port(), free_port()
    url = f"postgresql://postgres@127.0.0.1:{a},127.0.0.1:{b}/mirror"
    client = await client_with(db_url=url, db_timeout=1.0)  # type: ignore[operator]
    body, headers = signed(ORDER)
    webhook = await client.post("/webhooks", data=body, headers=headers)
    assert webhook.status == 503 and webhook.headers["Retry-After"]
    ready = await client.get("/readyz")
    assert ready.status == 503 and ready.headers["Retry-After"]
    answer = await ready.json()
    assert answer["database"] == "unreachable"
    assert answer["reason"] == "no configured database host answers"
    assert set(answer["hosts"]) == {f"127.0.0.1:{a}", f"127.0.0.1:{b}"}
    assert all(role.startswith("unreachable") for role in answer["hosts"].values())


async def test_reads_come_from_the_read_url(db_url: str, replica_url: str,
                                            client_with: object) -> None:
    await _fill(replica_url)  # only the "replica" has the order
    client = await client_with(db_url=db_url, read_database_url=replica_url)  # type: ignore[operator]
    got = await client.get("/objects/order/ord_ha", headers=AUTH)
    assert got.status == 200, await got.text()
    assert (await got.json())["data"]["status"] == "open"
    history = await client.get("/objects/order/ord_ha/history", headers=AUTH)
    assert history.status == 200
    ready = await (await client.get("/readyz")).json()
    assert ready["read_replica"] == {"status": "ok", "in_recovery": False, "lag_seconds": 0.0,
                                     "reads": "replica"}


async def test_reads_fall_back_to_the_primary_while_the_replica_is_unreachable(
        db_url: str, client_with: object) -> None:
    await _fill(db_url)
    client = await client_with(db_url=db_url, read_database_url=nowhere(),  # type: ignore[operator]
                               db_timeout=1.0)
    got = await client.get("/objects/order/ord_ha", headers=AUTH)
    assert got.status == 200, await got.text()
    assert (await got.json())["data"]["status"] == "open"
    ready = await client.get("/readyz")
    answer = await ready.json()
    assert answer["database"] == "ok"
    assert answer["read_replica"]["status"] == "unreachable"
    assert answer["read_replica"]["reads"].startswith("primary")


async def test_nothing_can_write_through_a_read_connection(db_url: str) -> None:
    # Even pointed at a primary (a promoted replica, a configuration slip), the read pool's
    # sessions are read-only, and a refused write is raised, never retried on the primary.
    primary = await create_pool(db_url)
    replica = await create_pool(db_url, read_only=True)
    reader = Reader(primary, replica)
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await reader.run(lambda conn: conn.execute(
                "INSERT INTO mirror.poison (resource, connection_id, object_id, reason, "
                "last_position) VALUES ('order', 'c', 'o', 'r', 0)"))
        assert await reader.run(lambda conn: conn.fetchval(
            "SELECT count(*) FROM mirror.poison")) == 0
    finally:
        await reader.close()
        await primary.close()


def mirror(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
            "MIRROR_LOG_LEVEL": "WARNING", **env}
    return subprocess.run([sys.executable, "-m", "mirror", *args], env=full,
                          capture_output=True, text=True, timeout=120)


async def test_as_of_history_and_status_use_the_read_url(db_url: str,
                                                         replica_url: str) -> None:
    await _fill(replica_url)
    env = {"DATABASE_URL": db_url, "MIRROR_READ_DATABASE_URL": replica_url}
    out = mirror(env, "as-of", "order", "ord_ha", "--at", "now")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "open"
    out = mirror(env, "history", "order", "ord_ha", "--json")
    assert out.returncode == 0 and len(json.loads(out.stdout)) == 1, out.stderr
    out = mirror(env, "status", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["read_replica"]["lag_seconds"] == 0.0
    assert "read replica:         not a standby, replay lag 0.0 s" in \
        mirror(env, "status").stdout

    # The replica gone: the same answers, from the primary (which lacks the order here).
    gone = {**env, "MIRROR_READ_DATABASE_URL": nowhere()}
    out = mirror(gone, "as-of", "order", "ord_ha", "--at", "now")
    assert out.returncode == 1 and "reading from the primary" in out.stderr
    out = mirror(gone, "status", "--json")
    assert json.loads(out.stdout)["read_replica"]["status"] == "unreachable"
