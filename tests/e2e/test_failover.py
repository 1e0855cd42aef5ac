"""Losing the database host: a real primary, synchronous standby and hot standby.

Promises (README: "High availability"): with synchronous replication configured on the server, an event the
mirror acknowledged survives the loss of the primary; when a standby is promoted the service
finds it by itself, without a restart, and answers 503 (with Retry-After) meanwhile, while
/readyz says why; projection completes on the new primary; the read API and `mirror as-of`
read from the hot standby, which is never written, and fall back to the primary while it is
unreachable.

The clusters are built by tests/e2e/replication.py (primary ``a``, synchronous standby ``b``,
read replica ``c`` streaming from ``b``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from mirror.sample import message_id
from tests.conftest import API_TOKEN
from tests.e2e.harness import Service
from tests.e2e.replication import Rig, query, value, wait_for
from tests.signing import envelope, iso, signed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
BASE = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
CLIENTS = 6
OBJECTS_PER_CLIENT = 5


@pytest.fixture
async def rig() -> Any:
    built = Rig()
    try:
        await built.build()
        yield built
    finally:
        print(built.logs())  # shown when the test fails
        built.close()


@pytest.fixture
def service(rig: Rig, tmp_path: Path) -> Iterator[Service]:
    """`mirror serve` given both possible primaries, reading from the hot standby ``c``."""
    started = Service(rig.database_url, tmp_path / "service", {
        "MIRROR_READ_DATABASE_URL": rig.c.url(), "MIRROR_INGRESS_PROCESSES": "1",
        "MIRROR_DB_TIMEOUT": "3"})
    try:
        yield started.start()
    finally:
        if started.running:
            started.stop()


def mirror(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
           "DATABASE_URL": rig.database_url, "MIRROR_READ_DATABASE_URL": rig.c.url(),
           "MIRROR_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "mirror", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def status(rig: Rig) -> dict[str, Any]:
    out = mirror(rig, "status", "--json")
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def order(object_id: str, n: int) -> dict[str, Any]:
    """The n-th state of an order: status ``s<n>``, changed at BASE + n seconds."""
    return envelope("order.created" if n < OBJECTS_PER_CLIENT else "order.updated",
                    {"id": object_id, "status": f"s{n}",
                     "updated_date": iso(BASE + timedelta(seconds=n))})


@dataclass
class SvixLoad:
    """CLIENTS senders, each delivering its own events one after another and retrying each,
    re-signed, on any non-2xx answer or timeout until it is acknowledged, as Svix does."""

    service: Service
    phase: str = "before"
    acknowledged: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (object, n)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    without_retry_after: int = 0
    latest: dict[str, int] = field(default_factory=dict)  # object -> last acknowledged n
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def acked_in(self, phase: str) -> int:
        return self.outcomes[(phase, "200")]

    async def deliver(self, session: aiohttp.ClientSession, event: dict[str, Any],
                      object_id: str, n: int) -> None:
        event_id = message_id()
        body = orjson.dumps(event)
        delay = 0.1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, headers = signed(body, msg_id=event_id)
            phase = self.phase
            try:
                async with session.post(f"{self.service.url}/webhooks", data=body,
                                        headers=headers) as response:
                    await response.read()
                    outcome = str(response.status)
                    if response.status == 503 and "Retry-After" not in response.headers:
                        self.without_retry_after += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                outcome = type(exc).__name__
            self.outcomes[(phase, outcome)] += 1
            if outcome == "200":
                self.acknowledged[event_id] = (object_id, n)
                self.latest[object_id] = max(n, self.latest.get(object_id, -1))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError(f"event {event_id} never acknowledged")

    async def client(self, session: aiohttp.ClientSession, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            object_id = f"ord_{index}_{n % OBJECTS_PER_CLIENT}"
            await self.deliver(session, order(object_id, n), object_id, n)
            n += 1


async def readyz(session: aiohttp.ClientSession, service: Service) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{service.url}/readyz") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def get_object(session: aiohttp.ClientSession, service: Service, object_id: str,
                     at: datetime | None = None) -> tuple[int, dict[str, Any]]:
    params = {"connection_id": "conn_1"} | ({"at": iso(at)} if at else {})
    async with session.get(f"{service.url}/objects/order/{object_id}", params=params,
                           headers=AUTH) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def until(condition: Any, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


AS_OF_SQL = "SELECT mirror.object_as_of('order', $1, $2, 'conn_1') AS data"


async def test_failover_keeps_every_acknowledged_event_and_resumes_without_restart(
        rig: Rig, service: Service) -> None:
    load = SvixLoad(service)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        senders = [asyncio.create_task(load.client(session, i)) for i in range(CLIENTS)]
        try:
            await until(lambda: load.acked_in("before") >= 60, "load before the failover")

            async def ready_with_replica() -> bool:
                code, body = await readyz(session, service)
                return code == 200 and body["read_replica"]["status"] == "ok"

            await wait_for(ready_with_replica, "/readyz before the failover", 60)

            # The primary's host dies.
            load.phase = "outage"
            rig.a.kill_postmaster()
            lost_at = time.monotonic()

            async def explained() -> dict[str, Any] | None:
                code, body = await readyz(session, service)
                waiting = code == 503 and body.get("hosts", {}).get(rig.b.host) == \
                    "standby (read-only)"
                return body if waiting else None

            during = await wait_for(explained, "/readyz to explain the missing primary", 30)
            assert during["database"] == "unreachable"
            assert "no primary" in during["reason"]
            assert during["hosts"][rig.a.host].startswith("unreachable")
            await until(lambda: sum(n for (phase, outcome), n in load.outcomes.items()
                                    if phase == "outage" and outcome == "503") >= CLIENTS,
                        "503 answers while there is no primary")

            await asyncio.sleep(2.0)  # Svix keeps retrying while nobody has promoted yet
            # The operator (or an orchestrator) promotes the synchronous standby.
            rig.b.promote()
            load.phase = "after"
            await until(lambda: load.acked_in("after") >= 60, "load after the promotion")
            resumed = time.monotonic() - lost_at
        finally:
            load.stop.set()
            await asyncio.gather(*senders)

        # Resumed by itself: the same process, no projection process restarted.
        assert service.starts == 1 and service.running
        assert "projection process exited" not in service.logs()
        answers = {outcome for (_, outcome) in load.outcomes}
        assert answers <= {"200", "503"}, load.outcomes
        assert load.without_retry_after == 0, "a 503 without Retry-After"

        # Every acknowledged event is on the new primary.
        stored = {r["event_id"] for r in await query(rig.b.url(),
                                                     "SELECT event_id FROM mirror.events")}
        missing = set(load.acknowledged) - stored
        assert not missing, f"{len(missing)} acknowledged events lost in the failover"

        await wait_for(ready_with_replica, "/readyz to be ready on the new primary", 60)

        # Projection completes on the new primary (`mirror status` asks it).
        report: dict[str, Any] = {}

        async def drained() -> bool:
            nonlocal report
            report = await asyncio.to_thread(status, rig)
            return bool(report["projection_lag_events"] == 0 and
                        report["events"] == len(stored))

        await wait_for(drained, "projection to drain on the new primary", 120)
        assert report["read_replica"]["in_recovery"] is True

        # The read replica follows the new primary; once it has caught up, as-of answers
        # there equal the new primary's, over HTTP (which reads the replica) and in SQL.
        await rig.caught_up(rig.c, rig.b)
        assert await value(rig.c.url("postgres"), "SELECT pg_is_in_recovery()")
        objects = sorted(load.latest)
        times = [BASE + timedelta(seconds=s) for s in (0, 7, 30, 10_000)]
        compared = 0
        for object_id in objects:
            for at in times:
                on_primary = (await query(rig.b.url(), AS_OF_SQL, object_id, at))[0]["data"]
                on_replica = (await query(rig.c.url(), AS_OF_SQL, object_id, at))[0]["data"]
                assert on_replica == on_primary, (object_id, at)
                code, body = await get_object(session, service, object_id, at)
                if on_primary is None:
                    assert code == 404
                else:
                    assert code == 200 and body["data"] == json.loads(on_primary)
                compared += 1
            # The current state is the last acknowledged one: nothing acknowledged was lost.
            code, body = await get_object(session, service, object_id)
            assert body["data"]["status"] == f"s{load.latest[object_id]}"
    print(f"\nfailover: {len(load.acknowledged)} events acknowledged, none lost; "
          f"answers {dict(load.outcomes)}; writes resumed {resumed:.1f} s after the primary "
          f"died; {compared} as-of answers equal on replica and new primary")


async def test_reads_come_from_the_hot_standby_which_is_never_written(
        rig: Rig, service: Service) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async def post(n: int) -> None:
            body, headers = signed(order("ord_r", n))
            async with session.post(f"{service.url}/webhooks", data=body,
                                    headers=headers) as response:
                assert response.status == 200, await response.text()

        async def current() -> str | None:
            code, body = await get_object(session, service, "ord_r")
            return str(body["data"]["status"]) if code == 200 else None

        async def on_primary() -> str | None:
            rows = await query(rig.a.url(), "SELECT data->>'status' AS s FROM mirror.orders "
                                            "WHERE id = 'ord_r'")
            return rows[0]["s"] if rows else None

        await post(0)
        await wait_for(lambda: _equals(current, "s0"), "the first state on the replica")
        sessions = await value(rig.c.url("postgres"),
                               "SELECT count(*) FROM pg_stat_activity "
                               "WHERE application_name = 'mirror-read'")
        assert sessions >= 1, "the read API did not read from the hot standby"

        # Replay paused on the standby: the primary moves on, reads show the replica's past.
        await query(rig.c.url("postgres"), "SELECT pg_wal_replay_pause()")
        await post(1)
        await wait_for(lambda: _equals(on_primary, "s1"), "the update on the primary")
        await asyncio.sleep(1.1)  # a lag of at least a second, whatever the clocks
        assert await current() == "s0"
        code, ready = await readyz(session, service)
        assert code == 200 and ready["read_replica"]["in_recovery"] is True
        assert ready["read_replica"]["lag_seconds"] >= 1.0, ready
        report = await asyncio.to_thread(status, rig)
        assert report["read_replica"]["lag_seconds"] >= 1.0
        out = await asyncio.to_thread(mirror, rig, "as-of", "order", "ord_r", "--at", "now")
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "s0", out.stderr
        out = await asyncio.to_thread(mirror, rig, "status")
        assert "read replica:         standby, replay lag" in out.stdout

        await query(rig.c.url("postgres"), "SELECT pg_wal_replay_resume()")
        await wait_for(lambda: _equals(current, "s1"), "the replica to catch up")

        async def no_lag() -> bool:
            _, body = await readyz(session, service)
            return bool(body["read_replica"]["lag_seconds"] == 0)

        await wait_for(no_lag, "the replay lag to return to 0")

        # The standby gone: reads fall back to the primary, and /readyz says so.
        rig.c.stop("fast")
        assert await current() == "s1"
        code, ready = await readyz(session, service)
        assert code == 200, ready
        assert ready["read_replica"]["status"] == "unreachable"
        assert ready["read_replica"]["reads"].startswith("primary")
        out = await asyncio.to_thread(mirror, rig, "as-of", "order", "ord_r", "--at", "now")
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "s1"
        assert "reading from the primary" in out.stderr

    # A hot standby refuses every write; none was attempted (none failed).
    logs = service.logs()
    assert "read-only" not in logs and "ReadOnlySQLTransaction" not in logs


async def _equals(get: Any, expected: str) -> bool:
    return bool(await get() == expected)
