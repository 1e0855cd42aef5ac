"""Completing truncated deliveries: the full event behind each ``data_url``, appended once.

A delivery too large for Svix arrives as a stub (``data_truncated: true``, ``data`` reduced to
the id, a ``data_url``); mirror.parsing stores it with unusable_reason ``data truncated``. The
full event, fetched from ``data_url`` with the API key, is appended as origin ``fetch`` with
event id ``fetch_`` + the stub's id; appended after the stub, it is the completing version.

Exactly once
------------
The event id is deterministic, and ``mirror.events.event_id`` is unique: whoever appends it
second adds nothing, so the log holds each completion once whatever runs. What keeps several
service instances from fetching the same ``data_url`` is ``mirror.completions``: one row per
truncated delivery (pending, completed, failed), claimed with ``FOR UPDATE SKIP LOCKED`` and a
lease (``lease_until``) taken on the database clock, so every host agrees on when a lease has
run out. A worker that dies holding a lease only delays that delivery until the lease expires.

Discovery
---------
Rows are created by the worker from the log itself, so a stub received while no key was
configured (or by an ingress-only process) is found at the next start. Each poll looks only at
the last minutes of the log (``received_at`` is set before the insert commits, and a commit
never lags it by minutes: the ingress gives up after its database timeout); a full scan runs at
start and every few minutes as the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from mirror import parsing
from mirror.errors import MirrorError
from mirror.eventlog import Record, insert_records
from mirror.metrics import Metrics
from mirror.trackstar.client import (
    ApiSettings,
    AuthFailed,
    NotApiHost,
    RetryPolicy,
    TrackstarClient,
    TrackstarError,
)
from mirror.trackstar.snapshots import canonical_json
from projections.base import normalise_kind

log = logging.getLogger("mirror.trackstar.completion")

FETCH_PREFIX = "fetch_"
TRUNCATED = "data truncated"

# Stubs of the recent past not yet known to mirror.completions (NULL window: the whole log).
DISCOVER_SQL = """
INSERT INTO mirror.completions (connection_id, event_id, state, completed_at)
SELECT e.connection_id, e.event_id,
       CASE WHEN f.event_id IS NULL THEN 'pending' ELSE 'completed' END, f.received_at
FROM mirror.events e
LEFT JOIN mirror.events f ON f.event_id = 'fetch_' || e.event_id
WHERE e.unusable_reason = 'data truncated' AND e.connection_id IS NOT NULL
  AND ($1::float8 IS NULL OR e.received_at > clock_timestamp() - make_interval(secs => $1))
  AND NOT EXISTS (SELECT 1 FROM mirror.completions c
                  WHERE c.connection_id = e.connection_id AND c.event_id = e.event_id)
ON CONFLICT (connection_id, event_id) DO NOTHING
"""
# Leases run on the database clock, the one every host shares.
CLAIM_SQL = """
WITH due AS (
    SELECT connection_id, event_id FROM mirror.completions
    WHERE state = 'pending' AND next_attempt_at <= clock_timestamp()
      AND (lease_until IS NULL OR lease_until <= clock_timestamp())
    ORDER BY next_attempt_at, event_id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE mirror.completions c
SET lease_owner = $1, lease_until = clock_timestamp() + make_interval(secs => $3),
    attempts = c.attempts + 1, updated_at = clock_timestamp()
FROM due JOIN mirror.events e ON e.event_id = due.event_id
WHERE c.connection_id = due.connection_id AND c.event_id = due.event_id
RETURNING c.connection_id, c.event_id, c.attempts, e.object_id, e.body
"""
COMPLETED_SQL = """
UPDATE mirror.completions
SET state = 'completed', completed_at = clock_timestamp(), reason = NULL,
    lease_owner = NULL, lease_until = NULL, updated_at = clock_timestamp()
WHERE connection_id = $1 AND event_id = $2 AND state <> 'completed'
"""
FAILED_SQL = """
UPDATE mirror.completions
SET state = 'failed', reason = $3, lease_owner = NULL, lease_until = NULL,
    updated_at = clock_timestamp()
WHERE connection_id = $1 AND event_id = $2 AND state = 'pending'
"""
RETRY_SQL = """
UPDATE mirror.completions
SET reason = $3, next_attempt_at = clock_timestamp() + make_interval(secs => $4),
    lease_owner = NULL, lease_until = NULL, updated_at = clock_timestamp()
WHERE connection_id = $1 AND event_id = $2 AND state = 'pending'
"""
# By hand (`mirror fetch-truncated`): every stub not completed yet, failed ones included.
TRUNCATED_SQL = """
SELECT e.connection_id, e.event_id, e.object_id, e.body
FROM mirror.events e
WHERE e.unusable_reason = 'data truncated' AND e.connection_id IS NOT NULL
  AND ($1::text IS NULL OR e.connection_id = $1)
  AND NOT EXISTS (SELECT 1 FROM mirror.events f WHERE f.event_id = 'fetch_' || e.event_id)
ORDER BY e.position
LIMIT $2
"""
RECORD_SQL = """
INSERT INTO mirror.completions (connection_id, event_id, state, attempts, reason, completed_at)
VALUES ($1, $2, $3, 1, $4, CASE WHEN $3 = 'completed' THEN clock_timestamp() END)
ON CONFLICT (connection_id, event_id) DO UPDATE
SET state = CASE WHEN mirror.completions.state = 'completed' THEN 'completed'
                 ELSE EXCLUDED.state END,
    reason = EXCLUDED.reason, attempts = mirror.completions.attempts + 1,
    completed_at = coalesce(mirror.completions.completed_at, EXCLUDED.completed_at),
    updated_at = clock_timestamp()
"""
# Every truncated delivery in the log, by where its completion stands.
COUNTS_SQL = """
SELECT CASE WHEN c.state IS NOT NULL THEN c.state
            WHEN EXISTS (SELECT 1 FROM mirror.events f WHERE f.event_id = 'fetch_' || e.event_id)
            THEN 'completed'
            ELSE 'pending' END AS state,
       count(*) AS n
FROM mirror.events e
LEFT JOIN mirror.completions c ON c.connection_id = e.connection_id AND c.event_id = e.event_id
WHERE e.unusable_reason = 'data truncated'
GROUP BY 1
"""
FAILURES_SQL = """
SELECT connection_id, event_id, reason, updated_at FROM mirror.completions
WHERE state = 'failed' ORDER BY updated_at DESC LIMIT $1
"""


class GiveUp(MirrorError):
    """This delivery can never be completed (gone, not on the API host, not the same event)."""


@dataclass(frozen=True)
class FetchResult:
    """What became of one truncated delivery."""

    event_id: str
    status: str          # fetched | duplicate | failed | retry
    message: str = ""


def completed_event(stub: Mapping[str, Any], fetched: Any) -> dict[str, Any]:
    """The full event for a truncated ``stub`` from what its ``data_url`` answered: either
    the whole event, or just the object (then the stub's envelope is kept around it)."""
    if isinstance(fetched, dict) and isinstance(fetched.get("data"), dict) \
            and "event_type" in fetched:
        if fetched.get("data_truncated") is True:
            raise MirrorError("data_url answered a truncated event again")
        full = dict(fetched)
        for key in ("connection_id", "event_type"):
            if key in full and key in stub and \
                    normalise_kind(str(full[key])) != normalise_kind(str(stub[key])):
                raise MirrorError(f"the fetched event's {key} differs from the delivery's")
    elif isinstance(fetched, dict) and "id" in fetched:
        full = {k: v for k, v in stub.items() if k != "data"}
        full["data"] = fetched
    else:
        raise MirrorError("data_url answered neither an event nor an object")
    # The delivery's envelope is what Svix signed: it names the event.
    for key in ("connection_id", "event_type", "integration_name", "integration_type"):
        if key in stub:
            full[key] = stub[key]
    if "previous_attributes" not in full and isinstance(stub.get("previous_attributes"), dict):
        full["previous_attributes"] = stub["previous_attributes"]
    full.pop("data_truncated", None)
    full.pop("data_url", None)
    return full


async def fetch_full(client: TrackstarClient, event_id: str, object_id: str | None,
                     body: bytes, received_at: datetime) -> Record:
    """The completing record of one stub. Raises GiveUp when it can never be had, and
    TrackstarError (or AuthFailed) when a later try may succeed."""
    try:
        stub = parsing.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise GiveUp("the stored delivery is not JSON") from None
    data_url = stub.get("data_url") if isinstance(stub, dict) else None
    if not isinstance(data_url, str) or not data_url:
        raise GiveUp("the delivery carries no data_url")
    try:
        fetched = await client.fetch_event(data_url)
    except NotApiHost as exc:
        raise GiveUp(str(exc)) from None
    except AuthFailed:
        raise
    except TrackstarError as exc:
        if exc.status in {404, 410}:
            raise GiveUp(f"data_url is gone ({exc})") from None
        if 400 <= exc.status < 500 and exc.status not in {408, 425, 429}:
            raise GiveUp(f"data_url refused the request ({exc})") from None
        raise
    try:
        full = completed_event(stub, fetched)
    except MirrorError as exc:
        raise GiveUp(str(exc)) from None
    parsed = parsing.parse(canonical_json(full))
    if parsed.unusable_reason is not None:
        raise GiveUp(f"the fetched event is not usable: {parsed.unusable_reason}")
    if parsed.object_id != object_id:
        raise GiveUp("the fetched event is about another object")
    return Record(FETCH_PREFIX + event_id, received_at, None, "fetch", parsed)


async def append_completion(conn: asyncpg.Connection, connection_id: str, stub_id: str,
                            record: Record) -> bool:
    """Append the full event and mark the delivery completed, in one transaction; True if
    the event is new to the log."""
    async with conn.transaction():
        new = await insert_records(conn, [record])
        if await conn.execute(COMPLETED_SQL, connection_id, stub_id) == "UPDATE 0":
            # No row yet (by hand, before any worker saw it) or completed already.
            await conn.execute(RECORD_SQL, connection_id, stub_id, "completed", None)
    return bool(new)


async def fetch_truncated(conn: asyncpg.Connection, client: TrackstarClient, *,
                          connection_id: str | None = None, limit: int = 1000,
                          now: Callable[[], datetime] = lambda: datetime.now(UTC),
                          ) -> list[FetchResult]:
    """`mirror fetch-truncated`: try every truncated delivery not completed yet, once, failed
    ones included. The stub itself stays in the log, unprojected."""
    rows = await conn.fetch(TRUNCATED_SQL, connection_id, limit)
    results: list[FetchResult] = []
    for row in rows:
        event_id, conn_id = row["event_id"], row["connection_id"]
        try:
            record = await fetch_full(client, event_id, row["object_id"], bytes(row["body"]),
                                      now())
            new = await append_completion(conn, conn_id, event_id, record)
            results.append(FetchResult(event_id, "fetched" if new else "duplicate"))
        except AuthFailed:
            raise  # the API key is refused: no other event can do better
        except (GiveUp, TrackstarError) as exc:
            message = str(exc)[:300]
            log.warning("truncated event not completed",
                        extra={"event_id": event_id, "error": message})
            state = "failed" if isinstance(exc, GiveUp) else "pending"
            await conn.execute(RECORD_SQL, conn_id, event_id, state, message)
            results.append(FetchResult(event_id, "failed", message))
    return results


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    """How many truncated deliveries are pending, completed and failed."""
    found = {"pending": 0, "completed": 0, "failed": 0}
    for row in await conn.fetch(COUNTS_SQL):
        found[row["state"]] = found.get(row["state"], 0) + row["n"]
    return found


async def failures(conn: asyncpg.Connection, limit: int = 20) -> list[dict[str, Any]]:
    """The latest deliveries given up on, with the reason."""
    return [dict(r) for r in await conn.fetch(FAILURES_SQL, limit)]


async def refresh_gauges(conn: asyncpg.Connection, metrics: Metrics) -> None:
    """Set the completion gauges of /metrics from the database."""
    for state, n in (await counts(conn)).items():
        metrics.completions.labels(state).set(n)


class CompletionWorker:
    """Completes truncated deliveries while the service runs (only when an API key is set).

    One lifecycle: ``start``; ``stop`` (safe twice) lets the batch in hand finish, up to a
    grace period, then cancels it (its leases run out and another instance takes over).
    """

    def __init__(self, pool: asyncpg.Pool, api: ApiSettings, *,
                 metrics: Metrics | None = None, poll_interval: float = 0.5,
                 batch_size: int = 8, lease_seconds: float = 120.0,
                 retry: RetryPolicy | None = None, request_timeout: float = 20.0,
                 max_attempts: int = 25, max_backoff: float = 3600.0,
                 recent_seconds: float = 600.0, full_scan_every: float = 300.0) -> None:
        self._pool = pool
        self._api = api
        self._metrics = metrics
        self._poll = poll_interval
        self._batch = batch_size
        self._lease = lease_seconds
        # Each try retries 5xx and dropped connections a few times, quickly; a delivery that
        # still fails is tried again later with a growing delay (see _later).
        self._retry = retry or RetryPolicy(attempts=3, base_delay=0.5, max_delay=5.0,
                                           max_rate_limited=20, max_retry_after=60.0)
        self._timeout = request_timeout
        self._max_attempts = max_attempts
        self._max_backoff = max_backoff
        self._recent = recent_seconds
        self._full_scan_every = full_scan_every
        self.owner = f"{socket.gethostname()}:{os.getpid()}:completion"
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Run in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="completion")

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the batch in hand (at most ``grace`` seconds), then stop. Safe twice."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_full = -self._full_scan_every
        async with TrackstarClient(self._api, retry=self._retry,
                                   timeout=self._timeout) as client:
            pause = self._poll
            while not self._stopping.is_set():
                handled = 0
                try:
                    full = loop.time() - last_full >= self._full_scan_every
                    handled = await self.run_once(client, full_scan=full)
                    if full:
                        last_full = loop.time()
                    pause = self._poll
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is down, say: try again later
                    log.warning("completion round failed",
                                extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    pause = min(30.0, max(pause * 2, 1.0))
                if handled == 0 or pause > self._poll:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), pause)

    async def run_once(self, client: TrackstarClient, *, full_scan: bool = False) -> int:
        """Discover new stubs, claim a batch and complete it; the number of deliveries
        handled."""
        async with self._pool.acquire() as conn:
            await conn.execute(DISCOVER_SQL, None if full_scan else self._recent)
            claimed = await conn.fetch(CLAIM_SQL, self.owner, self._batch, self._lease)
        if claimed:
            await asyncio.gather(*(self._complete(client, row) for row in claimed))
        return len(claimed)

    async def _complete(self, client: TrackstarClient, row: Mapping[str, Any]) -> None:
        connection_id, event_id = row["connection_id"], row["event_id"]
        outcome = "completed"
        try:
            record = await fetch_full(client, event_id, row["object_id"], bytes(row["body"]),
                                      datetime.now(UTC))
            async with self._pool.acquire() as conn:
                new = await append_completion(conn, connection_id, event_id, record)
            log.info("truncated delivery completed",
                     extra={"event_id": event_id, "new": new, "attempt": row["attempts"]})
        except GiveUp as exc:
            outcome = "failed"
            await self._give_up(connection_id, event_id, str(exc))
        except (TrackstarError, OSError, asyncpg.PostgresError) as exc:
            message = f"{type(exc).__name__}: {str(exc)[:300]}"
            if row["attempts"] >= self._max_attempts:
                outcome = "failed"
                await self._give_up(connection_id, event_id,
                                    f"gave up after {row['attempts']} attempts: {message}")
            else:
                outcome = "retry"
                delay = self._later(row["attempts"])
                log.warning("truncated delivery not completed, trying again later",
                            extra={"event_id": event_id, "error": message,
                                   "attempt": row["attempts"], "delay": delay})
                async with self._pool.acquire() as conn:
                    await conn.execute(RETRY_SQL, connection_id, event_id, message, delay)
        if self._metrics is not None:
            self._metrics.completion_attempts.labels(outcome).inc()

    async def _give_up(self, connection_id: str, event_id: str, reason: str) -> None:
        log.warning("truncated delivery cannot be completed",
                    extra={"event_id": event_id, "reason": reason[:300]})
        async with self._pool.acquire() as conn:
            await conn.execute(FAILED_SQL, connection_id, event_id, reason[:1000])

    def _later(self, attempts: int) -> float:
        """Seconds until the next try of a delivery that failed ``attempts`` times."""
        return float(min(self._max_backoff, 2.0 ** min(attempts, 20)))


def render_counts(found: Mapping[str, int], failed: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines for `mirror status`."""
    lines = [f"truncated deliveries: {found.get('pending', 0)} pending, "
             f"{found.get('completed', 0)} completed, {found.get('failed', 0)} failed"]
    for row in failed:
        lines.append(f"  failed {row['connection_id']}/{row['event_id']}: {row['reason']}")
    return lines
