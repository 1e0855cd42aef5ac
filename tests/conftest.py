"""Test fixtures: a real PostgreSQL (DATABASE_URL, or an embedded one), a template database
built from schema.sql once per session, and a fresh database per test cloned from it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import create_app
from mirror.db import create_pool, init_connection, migrate
from mirror.settings import Settings

SECRET = "whsec_" + base64.b64encode(b"trackstar-mirror-test-secret-01").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"trackstar-mirror-test-secret-02").decode()
API_TOKEN = "test-token-" + "x" * 24


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """An admin URL of a real PostgreSQL server."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    from mirror import embedded

    with tempfile.TemporaryDirectory(prefix="mirror-test-pg-") as tmp:
        server, mirror_url = embedded.start(Path(tmp) / "pg")
        yield with_database(mirror_url, "postgres")
        server.cleanup()


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """A template database with the schema applied, built once per session."""
    name = f"mirror_tpl_{os.getpid()}_{secrets.token_hex(3)}"

    async def build() -> None:
        await _admin(server_url, f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(server_url, name))
        try:
            await init_connection(conn)
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    yield name
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def fresh_database(server_url: str, template_db: str | None) -> Iterator[str]:
    """A database cloned from the template (cheap, fully isolated), dropped afterwards; with
    no template, an empty one."""
    name = f"mirror_t_{uuid.uuid4().hex[:12]}"
    template = f' TEMPLATE "{template_db}"' if template_db else ""
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"{template}'))
    try:
        yield with_database(server_url, name)
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh database cloned from the template, dropped after the test."""
    with fresh_database(server_url, template_db) as url:
        yield url


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_url)
    yield p
    await p.close()


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the test's database, JSON codecs set."""
    c = await asyncpg.connect(db_url)
    await init_connection(c)
    yield c
    await c.close()


def make_settings(db_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        database_url=db_url, webhook_secrets=(SECRET,), api_token=API_TOKEN,
        poll_interval=0.2, projector="inline",
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[object, object]]:
    """The real app on a real loopback socket, projection workers running."""
    app = create_app(settings)
    async with TestServer(app, host="127.0.0.1") as server, TestClient(server) as test_client:
        yield test_client
