"""The real service as a subprocess (`python -m mirror serve`), driven over HTTP with requests
signed by the svix library."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import API_TOKEN, SECRET
from tests.signing import envelope, signed

TOKEN_MARK = "tok_E2E_NEVER_LOGGED_42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(db_url: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "MIRROR_WEBHOOK_SECRET": SECRET,
           "MIRROR_API_TOKEN": API_TOKEN, "MIRROR_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    proc.stderr.read() if proc.stderr else "service died") from None
            import time
            time.sleep(0.05)
    yield base, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def order(order_id: str, minute: int, status: str, previous: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return envelope("order.updated" if previous else "order.created",
                    {"id": order_id, "status": status, "order_number": order_id,
                     "updated_date": f"2025-05-01T10:{minute:02d}:00Z",
                     "line_items": [{"sku": "A", "quantity": minute}]}, previous=previous)


async def test_signed_events_shuffled_and_duplicated_end_up_projected(
        service: tuple[str, subprocess.Popen[str]], db_url: str) -> None:
    base, proc = service
    deliveries = []
    for n in range(20):
        oid = f"ord_{n}"
        deliveries.append(signed(order(oid, 0, "open")))
        deliveries.append(signed(order(oid, 5, "picked", {"status": "open",
                                                           "updated_date": "2025-05-01T10:00:00Z"})))
        deliveries.append(signed(order(oid, 9, "shipped", {"status": "picked",
                                                            "updated_date": "2025-05-01T10:05:00Z"})))
    deliveries.append(signed(envelope("connection.created", {
        "created_date": "2025-05-01T09:00:00Z", "access_token": TOKEN_MARK})))
    deliveries += random.Random(3).sample(deliveries, 15)  # Svix retries
    random.Random(4).shuffle(deliveries)
    async with aiohttp.ClientSession() as session:
        async def post(body: bytes, headers: dict[str, str]) -> int:
            async with session.post(f"{base}/webhooks", data=body, headers=headers) as r:
                return r.status
        statuses = await asyncio.gather(*(post(b, h) for b, h in deliveries))
        assert set(statuses) == {200}
        async with session.get(f"{base}/healthz") as r:
            assert r.status == 200
        for _ in range(100):
            async with session.get(f"{base}/readyz") as r:
                ready = await r.json()
            if r.status == 200 and ready["lag"]["events"] == 0:
                break
            await asyncio.sleep(0.1)
        assert ready["status"] == "ready"
        conn = await asyncpg.connect(db_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM mirror.events") == 61
            for _ in range(50):
                statuses_db = dict(await conn.fetch("SELECT id, status FROM mirror.orders"))
                if len(statuses_db) == 20:
                    break
                await asyncio.sleep(0.1)
            assert statuses_db == {f"ord_{n}": "shipped" for n in range(20)}
            assert await conn.fetchval("SELECT count(*) FROM mirror.versions "
                                       "WHERE resource = 'order'") == 60
        finally:
            await conn.close()
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        async with session.get(f"{base}/objects/order/ord_3",
                               params={"at": "2025-05-01T10:06:00Z"}, headers=auth) as r:
            assert (await r.json())["data"]["status"] == "picked"
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
            assert 'mirror_webhook_requests_total{outcome="stored"} 61.0' in text
            assert 'mirror_webhook_requests_total{outcome="duplicate"} 15.0' in text
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert TOKEN_MARK not in err and SECRET not in err and API_TOKEN not in err


def test_service_refuses_to_start_without_a_valid_secret(db_url: str) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    for value, fragment in ((None, "is not set"), ("not-a-secret", "whsec_"),
                            ("whsec_!!!!", "base64")):
        env = {**base_env, "DATABASE_URL": db_url, "MIRROR_API_TOKEN": API_TOKEN}
        if value is not None:
            env["MIRROR_WEBHOOK_SECRET"] = value
        out = subprocess.run([sys.executable, "-m", "mirror", "serve"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "MIRROR_WEBHOOK_SECRET" in out.stderr and fragment in out.stderr


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_projection_process_dies_with_the_service(db_url: str) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "MIRROR_WEBHOOK_SECRET": SECRET,
           "MIRROR_API_TOKEN": API_TOKEN, "MIRROR_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    children: list[int] = []
    for _ in range(200):
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        children = [int(p) for p in out.stdout.split()]
        if children:
            break
        time.sleep(0.05)
    assert children, "mirror serve started no projection process"
    proc.kill()  # SIGKILL: no cleanup runs in the service
    proc.wait()
    for _ in range(100):
        if not any(_alive(c) for c in children):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"projection process {children} outlived the service")
