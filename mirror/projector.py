"""Projection workers: fold the log, a page at a time, into current state and history.

Reading the log without skipping late commits
---------------------------------------------
Positions come from a sequence at INSERT time, so a transaction that took position 5 may
commit after one that took position 6 is already visible. A reader that remembers "done up
to 6" would skip 5 forever. Each row therefore also records its writer's transaction id
(``txid``), and a reader only takes rows whose txid is below the xmin of its own snapshot:
every transaction below xmin has finished, so no row with such a txid can still appear.
Rows are consumed in (txid, position) order and the checkpoint is that pair; any row that
commits later belongs to a transaction at or above today's xmin, hence sorts after the
checkpoint, and is read then. A long transaction elsewhere holds xmin back: it delays
projection, it never loses an event.

Sharing the work
----------------
Events are spread over 128 partitions by a hash of the connection and object key, so one
object's events stay in one partition. Each worker holds leases on a fair share of the
partitions (mirror.checkpoints.owner/lease_until, renewed every couple of seconds; a dead
worker's leases expire and are taken over; a new worker makes the others give some up). A
page reads the next events of *all* the worker's partitions in one query and is folded and
written in one transaction, whatever the partition count: with the partition rows locked FOR
UPDATE and their owner checked, the checkpoints move with the rows they produced, so no
event is ever applied twice, even by a worker whose lease was taken over mid-page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from mirror import progress
from mirror.db import is_unavailable
from mirror.errors import Conflict
from mirror.fold import Anomaly, Candidate, Event, Prior, candidates_of, fold_from, unique
from mirror.metrics import Metrics
from mirror.store import (
    ObjectKey,
    Outcome,
    Tail,
    Writer,
    events_from_rows,
    load_folded_events,
    load_later_events,
    load_tails,
)
from projections import registry
from projections.base import Resource

log = logging.getLogger("mirror.projector")

PARTITIONS = progress.PARTITIONS

# The next events of several partitions at once, each after its own checkpoint and each
# limited on its own (a busy partition cannot starve the others).
FETCH_SQL = """
SELECT e.part, e.position, e.txid, e.resource, e.connection_id, e.object_id,
       e.unusable_reason, e.event_id, e.event_type, e.kind, e.received_at, e.origin, e.data,
       e.previous_attributes, e.integration_name, e.integration_type
FROM unnest($1::smallint[], $2::xid8[], $3::bigint[], $4::int[]) AS c(part, txid, pos, lim)
CROSS JOIN LATERAL (
    SELECT * FROM mirror.events e
    WHERE e.part = c.part AND (e.txid, e.position) > (c.txid, c.pos)
      AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY e.txid, e.position
    LIMIT c.lim) e
"""
# The checkpoints of this worker's partitions (with an owner, only those it still holds).
CHECKPOINTS_SQL = """
SELECT part, last_txid, last_position FROM mirror.checkpoints
WHERE part = ANY($1::smallint[]) AND ($2::text IS NULL OR owner = $2)
"""
# The partitions that have events this page, locked until it commits: only those, so an idle
# poll writes nothing, and two workers only ever wait for each other on a partition both
# think they hold. Locked in one order: no deadlocks.
LOCK_SQL = CHECKPOINTS_SQL + "ORDER BY part FOR UPDATE\n"
ADVANCE_SQL = """
UPDATE mirror.checkpoints c SET last_txid = u.txid, last_position = u.pos, updated_at = now()
FROM unnest($1::smallint[], $2::xid8[], $3::bigint[], $4::xid8[], $5::bigint[])
     AS u(part, txid, pos, old_txid, old_pos)
WHERE c.part = u.part AND c.last_txid = u.old_txid AND c.last_position = u.old_pos
"""


@dataclass
class _Cached:
    """An object's tail as this worker last wrote it."""

    current: Candidate | Prior | None
    last_instant: datetime | None
    first_received: datetime | None
    known_from: datetime | None


class TailCache:
    """Objects' tails across pages, most recently used kept. Only valid while this worker
    still owns the partition: a partition whose checkpoint is not the one this worker wrote
    last is dropped before its page is folded."""

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._items: OrderedDict[ObjectKey, _Cached] = OrderedDict()
        self._parts: dict[ObjectKey, int] = {}
        self._written: dict[int, tuple[int, int]] = {}

    def check(self, part: int, checkpoint: tuple[int, int]) -> None:
        if self._written.get(part) != checkpoint:
            for key in [k for k, p in self._parts.items() if p == part]:
                self._items.pop(key, None)
                del self._parts[key]

    def wrote(self, part: int, checkpoint: tuple[int, int]) -> None:
        self._written[part] = checkpoint

    def get(self, key: ObjectKey) -> _Cached | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: ObjectKey, part: int, value: _Cached) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._parts[key] = part
        while len(self._items) > self._size:
            old, _ = self._items.popitem(last=False)
            self._parts.pop(old, None)

    def drop(self, key: ObjectKey) -> None:
        self._items.pop(key, None)
        self._parts.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
        self._parts.clear()
        self._written.clear()


async def project_page(conn: asyncpg.Connection, parts: list[int], *, page_size: int = 2000,
                       owner: str | None = None, limits: dict[int, int] | None = None,
                       cache: TailCache | None = None, metrics: Metrics | None = None) -> int:
    """Fold the next events of ``parts`` in one transaction; return how many log rows it
    consumed (0: nothing to do, or no partition is this owner's any more)."""
    async with conn.transaction():
        held = await conn.fetch(CHECKPOINTS_SQL, parts, owner)
        if not held:
            return 0
        per_part = max(page_size // len(held), 16)
        lim = [min((limits or {}).get(r["part"], per_part), page_size) for r in held]
        rows = await conn.fetch(FETCH_SQL, [r["part"] for r in held],
                                [r["last_txid"] for r in held],
                                [r["last_position"] for r in held], lim)
        if not rows:
            return 0
        read = {r["part"]: (r["last_txid"], r["last_position"]) for r in held}
        locked = await conn.fetch(LOCK_SQL, sorted({r["part"] for r in rows}), owner)
        # A partition another worker advanced (or took over) since it was read is left for
        # the next page.
        mine = {r["part"] for r in locked if read[r["part"]] == (r["last_txid"],
                                                                 r["last_position"])}
        rows = [r for r in rows if r["part"] in mine]
        if not rows:
            return 0
        last: dict[int, tuple[Any, int]] = {}
        counts: dict[int, int] = {}
        for row in rows:
            last[row["part"]] = (row["txid"], row["position"])
            counts[row["part"]] = counts.get(row["part"], 0) + 1
        if limits is not None:
            # A partition that filled its share gets a larger one next time, others shrink
            # back, and the shares never add up to more than a page: a backlog in a few
            # partitions drains fast without starving the others or growing the page.
            wanted = {r["part"]: (n * 2 if counts.get(r["part"], 0) >= n else per_part)
                      for r, n in zip(held, lim, strict=True)}
            scale = min(1.0, page_size / max(sum(wanted.values()), 1))
            for part, n in wanted.items():
                limits[part] = max(int(n * scale), 16)
        old = {part: read[part] for part in mine}
        if cache is not None:
            for part, checkpoint in old.items():
                cache.check(part, (int(checkpoint[0]), checkpoint[1]))
        usable = [r for r in rows if r["unusable_reason"] is None and r["resource"] is not None]
        part_of = {(r["resource"], r["connection_id"], r["object_id"]): r["part"] for r in usable}
        await fold_page(conn, events_from_rows(usable), part_of, cache)
        moved = await conn.execute(
            ADVANCE_SQL, list(last), [v[0] for v in last.values()],
            [v[1] for v in last.values()], [old[p][0] for p in last],
            [old[p][1] for p in last])
        if moved != f"UPDATE {len(last)}":
            raise Conflict("a partition's checkpoint moved under this worker")
    if cache is not None:
        for part, (txid, position) in last.items():
            cache.wrote(part, (int(txid), position))
    if metrics is not None:
        metrics.projected.inc(len(rows))
    return len(rows)


async def fold_page(conn: asyncpg.Connection, fresh: dict[ObjectKey, list[Event]],
                    part_of: dict[ObjectKey, int], cache: TailCache | None) -> None:
    """Fold each object's new events onto what is stored and write the page."""
    failed: list[tuple[ObjectKey, str, int]] = []  # the objects whose fold raised
    outcomes: list[Outcome] = []
    tails_now: dict[ObjectKey, _Cached] = {}
    new: dict[ObjectKey, tuple[Resource, list[Candidate], list[Anomaly]]] = {}
    since: dict[ObjectKey, datetime] = {}
    for key, events in fresh.items():
        resource = registry.by_name(key[0])
        if resource is None:
            continue
        cands: list[Candidate] = []
        shown: list[Anomaly] = []
        try:
            for event in events:
                found, anomalies = candidates_of(resource, event)
                cands += found
                shown += anomalies
        except Exception as exc:  # a payload the fold cannot read: the object, not the page
            _poison(failed, key, exc, events, cache)
            continue
        new[key] = (resource, cands, shown)
        # Load the tail from the earliest *received* instant: in an in-order stream every
        # update also reveals the state at the stored last instant, which changes nothing.
        since[key] = min(c.valid_from for c in cands if not c.derived)
    tails: dict[ObjectKey, Tail] = {}
    unknown: dict[ObjectKey, datetime] = {}
    for key, t in since.items():
        hit = cache.get(key) if cache is not None else None
        if hit is not None and (hit.last_instant is None or t > hit.last_instant):
            # After everything stored: the cached current version is the prior.
            current = hit.current
            prior = None if current is None else _as_prior(current)
            tails[key] = Tail(prior, None, hit.last_instant, hit.first_received,
                              hit.known_from, False)
        else:
            unknown[key] = t
    tails.update(await load_tails(conn, unknown))
    earlier: dict[ObjectKey, datetime] = {}
    for key, (_, cands, _) in new.items():
        prior = tails[key].prior
        if prior is not None:
            cands[:] = [c for c in cands if not _redundant(c, prior)]
        t = min(c.valid_from for c in cands)
        if t < since[key] and tails[key].last_instant is not None:
            # A state revealed before what is stored last: re-fold from there.
            since[key] = earlier[key] = t
        else:
            since[key] = t
    if earlier:
        tails.update(await load_tails(conn, earlier))
    later = {k: t for k, t in since.items()
             if tails[k].last_instant is not None and t <= tails[k].last_instant  # type: ignore[operator]
             and not tails[k].poisoned}
    stored = await load_later_events(conn, later) if later else {}
    poisoned = [k for k in since if tails[k].poisoned]
    replay = await load_folded_events(conn, poisoned) if poisoned else {}
    for key, (resource, cands, shown) in new.items():
        tail = tails[key]
        t = since[key]
        refold = key in later
        try:
            if tail.poisoned:
                # Folded again from its first event: what was stored may be incomplete.
                for event in replay.get(key, []):
                    found, anomalies = candidates_of(resource, event)
                    cands += found
                    shown += anomalies
                t = min(c.valid_from for c in cands)
                tail = Tail(None, None, tail.last_instant, None, None, True)
                refold = True
            elif refold:
                for event in stored.get(key, []):
                    found, anomalies = candidates_of(resource, event)
                    cands += [c for c in found if c.valid_from >= t]
                    shown += [a for a in anomalies if a.at >= t]
            first = tail.first_received
            folded = fold_from(resource, tail.prior, unique(cands), first)
        except Exception as exc:
            _poison(failed, key, exc, fresh[key], cache)
            continue
        # The current state before this page, for the child rows (a re-fold reads them anew).
        before: dict[str, Any] | None = None
        if not refold and tail.prior is not None and not tail.prior.deleted:
            before = tail.prior.data
        outcomes.append(Outcome(key, t, refold, tail, folded, shown, before, not refold))
        if cache is not None and key in part_of:
            instants = [c.valid_from for c in folded.candidates]
            last_instant = max([*instants, *([tail.last_instant] if tail.last_instant else [])])
            received = [c.valid_from for c in folded.candidates if not c.derived]
            first_received = min([*received, *([first] if first else [])], default=None)
            known = [c.known_from for c in folded.candidates]
            known_from = min([*known, *([tail.known_from] if tail.known_from else [])],
                             default=None)
            tails_now[key] = _Cached(folded.current, last_instant, first_received, known_from)
    refused = await write_guarded(conn, outcomes, failed)
    if cache is not None:
        # Only what was written: a refused object is poison, folded again from its start.
        for key, cached in tails_now.items():
            if key not in refused:
                cache.put(key, part_of[key], cached)
        for key in refused:
            cache.drop(key)


async def write_guarded(conn: asyncpg.Connection, outcomes: list[Outcome],
                        failed: list[tuple[ObjectKey, str, int]]) -> set[ObjectKey]:
    """Write a page; an object the database refuses becomes poison instead of failing (and
    so stalling) its partitions. ``failed``: objects whose fold raised. Returns the objects
    the database refused."""
    writer = Writer()
    for out in outcomes:
        writer.add(out)
    for key, reason, position in failed:
        writer.poisoned(key, reason, position)
    try:
        async with conn.transaction():  # a savepoint inside the page's transaction
            await writer.write(conn)
        return set()
    except asyncpg.PostgresError as exc:
        if is_unavailable(exc):
            raise
        log.warning("page write refused, writing object by object",
                    extra={"sqlstate": exc.sqlstate})
    refused = Writer()
    keys: set[ObjectKey] = set()
    for key, reason, position in failed:
        refused.poisoned(key, reason, position)
    for out in outcomes:
        one = Writer()
        one.add(out)
        try:
            async with conn.transaction():
                await one.write(conn)
        except asyncpg.PostgresError as exc:
            if is_unavailable(exc):
                raise
            last = max((c.position for c in out.folded.candidates), default=0)
            refused.poisoned(out.key, f"database refused the fold: {exc.sqlstate} {exc}", last)
            keys.add(out.key)
    await refused.write(conn)
    return keys


def _poison(failed: list[tuple[ObjectKey, str, int]], key: ObjectKey, exc: Exception,
            events: list[Event], cache: TailCache | None) -> None:
    log.error("fold failed", extra={"resource": key[0], "object_id": key[2],
                                    "error": repr(exc)[:500]})
    failed.append((key, f"{type(exc).__name__}: {exc}", max(e.position for e in events)))
    if cache is not None:
        cache.drop(key)


def _as_prior(current: Candidate | Prior) -> Prior:
    if isinstance(current, Prior):
        return current
    return Prior(current.valid_from, current.data, current.state_hash, current.deleted,
                 current.event_id, current.position, current.derived, current.known_from)


def _redundant(c: Candidate, prior: Prior) -> bool:
    """A revealed state equal to the received version in force at its very instant, which
    was known no later: the fold would drop it (it can never decide an answer)."""
    return (c.derived and c.valid_from == prior.valid_from and not prior.derived
            and not prior.deleted and prior.state_hash == c.state_hash
            and prior.known_from is not None and prior.known_from <= c.known_from)


class Projector:
    """The projection workers of one process. ``start``, ``stop`` (safe twice), ``caught_up``."""

    def __init__(self, pool: asyncpg.Pool, url: str, *, workers: int = 1,
                 batch_size: int = 2000, poll_interval: float = 1.0,
                 metrics: Metrics | None = None) -> None:
        self._pool = pool
        self._url = url
        self._workers = workers
        self._page = batch_size
        self._poll = poll_interval
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.names = [f"{socket.gethostname()}:{os.getpid()}:{i}" for i in range(workers)]

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def start(self) -> None:
        self._stopping.clear()
        self._tasks = [asyncio.create_task(self._listen(), name="projector-listen")]
        self._tasks += [asyncio.create_task(self._work(i), name=f"projector-{i}")
                        for i in range(self._workers)]

    async def stop(self) -> None:
        """Let each worker finish (commit) its page, give up its leases, then end. Safe to
        call twice."""
        self._stopping.set()
        self._wake.set()
        for task in self._tasks:
            if task.get_name() == "projector-listen":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _listen(self) -> None:
        # NOTIFY wakes, polling decides: a lost notification only costs latency.
        while not self._stopping.is_set():
            try:
                conn = await asyncpg.connect(self._url, timeout=5)
            except Exception:
                await asyncio.sleep(self._poll)
                continue
            try:
                await conn.add_listener("mirror_events", lambda *_: self._wake.set())
                while not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._poll)
                    if self._stopping.is_set():
                        break
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _work(self, index: int) -> None:
        name = self.names[index]
        cache = TailCache()
        limits: dict[int, int] = {}
        parts: list[int] = []
        next_lease = 0.0
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            done = 0
            try:
                now = time.monotonic()
                if now >= next_lease:
                    async with self._pool.acquire() as conn:
                        held = await progress.keep_leases(conn, name)
                    if set(held) != set(parts):
                        cache.clear()
                    parts = held
                    next_lease = now + progress.RENEW_SECONDS
                if parts:
                    async with self._pool.acquire() as conn:
                        done = await project_page(conn, parts, page_size=self._page,
                                                  owner=name, limits=limits, cache=cache,
                                                  metrics=self._metrics)
            except Exception as exc:
                cache.clear()
                level = logging.WARNING if is_unavailable(exc) else logging.ERROR
                log.log(level, "projection page failed", extra={"error": repr(exc)[:500]})
                # Retry soon, then less often: a database back from an outage is picked up
                # within a fraction of a second, a long outage is not hammered.
                failures += 1
                next_lease = 0.0
                await asyncio.sleep(min(self._poll, 0.1 * 2 ** min(failures, 6)))
                continue
            failures = 0
            if done == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)
        with contextlib.suppress(Exception):
            async with self._pool.acquire() as conn:
                await progress.release_leases(conn, name)

    async def caught_up(self, timeout: float = 30.0) -> None:
        """Return once every event committed before the call has been projected."""
        async with self._pool.acquire() as conn:
            await progress.wait_caught_up(conn, timeout, wake=self._wake.set)
