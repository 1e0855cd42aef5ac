"""Database outages under load, against a PostgreSQL server the test owns.

Promise: while the database is gone (crashed: ``pg_ctl stop -m immediate``) or hung (every
PostgreSQL process SIGSTOPped) every webhook is answered promptly with 503, well within the
15 s Svix waits, and /readyz says not ready; nothing hangs. Once the database is back the
service recovers by itself, without a restart, and no acknowledged event is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest

from mirror.sample import message_id
from tests.e2e.harness import OwnedPostgres, Service, fetch, wait_projected
from tests.signing import envelope, signed

pytestmark = pytest.mark.slow

CLIENTS = 8
SVIX_TIMEOUT = 15.0  # seconds Svix waits for an answer before it counts a failure


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[OwnedPostgres]:
    """An embedded PostgreSQL of this test alone."""
    pg = OwnedPostgres(tmp_path / "pg")
    yield pg
    pg.close()


@dataclass
class Attempt:
    event_id: str
    phase: str
    outcome: str
    seconds: float


@dataclass
class Load:
    """CLIENTS clients posting new signed events back to back, each attempt recorded with the
    phase it started in."""

    service: Service
    phase: str = "before"
    bodies: dict[str, bytes] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def attempt(self, session: aiohttp.ClientSession, event_id: str, when: str) -> str:
        """Post one event (re-signed, as Svix does on every attempt); its outcome."""
        body = self.bodies[event_id]
        _, headers = signed(body, msg_id=event_id)
        started = time.monotonic()
        try:
            async with session.post(f"{self.service.url}/webhooks", data=body,
                                    headers=headers) as response:
                await response.read()
                outcome = str(response.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = type(exc).__name__
        self.attempts.append(Attempt(event_id, when, outcome, time.monotonic() - started))
        return outcome

    async def client(self, session: aiohttp.ClientSession, index: int) -> None:
        for n in range(1_000_000):
            if self.stop.is_set():
                return
            event_id = message_id()
            body, _ = signed(envelope("order.created", {
                "id": f"ord_{index}_{n}", "status": "open",
                "updated_date": "2025-08-01T10:00:00Z"}), msg_id=event_id)
            self.bodies[event_id] = body
            await self.attempt(session, event_id, self.phase)

    def count(self, when: str, outcome: str) -> int:
        return sum(a.phase == when and a.outcome == outcome for a in self.attempts)

    async def ready(self, session: aiohttp.ClientSession) -> int:
        async with session.get(f"{self.service.url}/readyz") as response:
            await response.read()
            return response.status

    async def until(self, condition: Callable[[], bool], what: str,
                    seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def run(self, outage: Callable[[], None], recover: Callable[[], None],
                  outage_seconds: float) -> tuple[list[int], str]:
        """Load before, during and after an outage; the /readyz answers during it and the
        /metrics text at the end."""
        timeout = aiohttp.ClientTimeout(total=2 * SVIX_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            load = [asyncio.create_task(self.client(session, i)) for i in range(CLIENTS)]
            await self.until(lambda: self.count("before", "200") >= 100, "load before")
            self.phase = "outage"
            await asyncio.to_thread(outage)
            began = time.monotonic()
            await self.until(lambda: self.count("outage", "503") >= CLIENTS,
                             "503 answers during the outage")
            ready = [await self.ready(session)]
            while time.monotonic() - began < outage_seconds:
                ready.append(await self.ready(session))
                await asyncio.sleep(0.2)
            self.phase = "recovery"
            await asyncio.to_thread(recover)
            await self.until(lambda: self.count("recovery", "200") >= 100, "recovery")
            self.stop.set()
            await asyncio.gather(*load)
            # Workers report by heartbeat; they reconnect within a few seconds of the database.
            deadline = time.monotonic() + 10
            while await self.ready(session) != 200:
                assert time.monotonic() < deadline, "/readyz did not recover"
                await asyncio.sleep(0.2)
            async with session.get(f"{self.service.url}/metrics") as response:
                metrics = await response.text()
        return ready, metrics

    async def check(self, url: str, ready: list[int], metrics: str, label: str) -> None:
        """Every promise of an outage, and a one-line report of the figures."""
        assert self.service.starts == 1 and self.service.running  # recovered by itself
        assert set(ready) == {503}, "/readyz said ready while the database was out"
        outcomes = {a.outcome for a in self.attempts}
        assert outcomes <= {"200", "503"}, f"answers other than 200 and 503: {outcomes}"
        slowest = max(a.seconds for a in self.attempts)
        assert slowest < SVIX_TIMEOUT, f"a request took {slowest:.1f} s"
        unavailable = [a.seconds for a in self.attempts if a.outcome == "503"]
        assert 'mirror_webhook_requests_total{outcome="unavailable"}' in metrics

        # Nothing acknowledged is missing; Svix's retries of the rest complete the set.
        acknowledged = {a.event_id for a in self.attempts if a.outcome == "200"}
        stored = {r["event_id"] for r in await fetch(url, "SELECT event_id FROM mirror.events")}
        assert acknowledged <= stored
        timeout = aiohttp.ClientTimeout(total=2 * SVIX_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            retried = await asyncio.gather(*(self.attempt(session, event_id, "retry")
                                             for event_id in self.bodies
                                             if event_id not in acknowledged))
        assert set(retried) <= {"200"}
        rows = await fetch(url, "SELECT event_id FROM mirror.events")
        assert sorted(r["event_id"] for r in rows) == sorted(self.bodies)
        await wait_projected(url)
        assert (await fetch(url, "SELECT count(*) AS n FROM mirror.orders"))[0]["n"] == \
            len(self.bodies)
        print(f"\n{label}: {len(self.attempts)} attempts; {len(unavailable)} answered 503, "
              f"median {statistics.median(unavailable) * 1000:.0f} ms, slowest "
              f"{max(unavailable) * 1000:.0f} ms; slowest answer overall "
              f"{slowest * 1000:.0f} ms; {len(stored - acknowledged)} stored without an "
              f"acknowledgement; {len(retried)} retried after recovery, all stored once")


async def test_database_crash_answers_503_promptly_and_recovers_without_restart(
        own_pg: OwnedPostgres, start_service: Callable[..., Service]) -> None:
    load = Load(start_service(db=own_pg.url))
    ready, metrics = await load.run(own_pg.stop, own_pg.start, outage_seconds=3.0)
    await load.check(own_pg.url, ready, metrics, "database crash")


def _postgres_processes(pg: OwnedPostgres) -> list[psutil.Process]:
    postmaster = psutil.Process(pg.server.get_pid())
    return [postmaster, *postmaster.children(recursive=True)]


async def test_hung_database_answers_503_within_svix_timeout_and_recovers(
        own_pg: OwnedPostgres, start_service: Callable[..., Service]) -> None:
    load = Load(start_service(db=own_pg.url))
    frozen: list[psutil.Process] = []

    def freeze() -> None:
        for process in _postgres_processes(own_pg):
            with contextlib.suppress(psutil.NoSuchProcess):  # a backend may just have ended
                process.send_signal(signal.SIGSTOP)
                frozen.append(process)

    def thaw() -> None:
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)

    try:
        ready, metrics = await load.run(freeze, thaw, outage_seconds=8.0)
    finally:
        thaw()
    await load.check(own_pg.url, ready, metrics, "hung database")
