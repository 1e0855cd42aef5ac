"""The load driver: pre-signed requests sent over raw keep-alive HTTP/1.1 connections.

It runs in its own process and does as little as possible per request (no HTTP client
library: a request is one prepared byte string), so the server, not the driver, is what the
figures measure. It reports its own CPU time so a reader can check that.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from svix.webhooks import Webhook

from bench.workload import Delivery


def sign_all(deliveries: list[Delivery], secret: str, port: int) -> list[bytes]:
    """Raw HTTP requests, each signed now by the svix library."""
    hook = Webhook(secret)
    now = datetime.now(UTC)
    stamp = str(int(now.timestamp()))
    out = []
    for d in deliveries:
        body = d.body.encode()
        head = (f"POST /webhooks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"svix-id: {d.msg_id}\r\nsvix-timestamp: {stamp}\r\n"
                f"svix-signature: {hook.sign(d.msg_id, now, d.body)}\r\n\r\n")
        out.append(head.encode() + body)
    return out


@dataclass
class Result:
    """What one load run measured."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    wall: float = 0.0
    driver_cpu: float = 0.0
    visibility: list[float] = field(default_factory=list)
    visibility_missing: int = 0


async def _one_connection(port: int, queue: list[tuple[int, bytes]], result: Result,
                          acked: dict[int, float] | None, pace: float | None = None,
                          origin: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue:
            index, request = queue.pop()
            if pace:
                # A steady rate: request i leaves at origin + i / pace, not as fast as possible.
                await asyncio.sleep(max(0.0, origin + index / pace - time.perf_counter()))
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            done = time.perf_counter()
            result.latencies.append(done - started)
            result.statuses[status] += 1
            if acked is not None and status == 200:
                acked[index] = time.time()
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def _watch_visibility(dsn: str, ids: dict[int, str], acked: dict[int, float],
                            result: Result, stop: asyncio.Event) -> None:
    """For sampled events: time from the 2xx to the event's version being visible."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    pending: dict[int, str] = {}
    try:
        deadline = None
        while True:
            for index in list(acked):
                if index in ids and index not in pending:
                    pending[index] = ids[index]
                    ids.pop(index)
            if pending:
                # Visible = folded: its partition's checkpoint has passed it.
                seen = await conn.fetch(
                    "SELECT e.event_id FROM mirror.events e WHERE e.event_id = ANY($1::text[])"
                    " AND NOT EXISTS (SELECT 1 FROM mirror.unprojected_events u"
                    " WHERE u.position = e.position)", list(pending.values()))
                now = time.time()
                found = {r["event_id"] for r in seen}
                for index, event_id in list(pending.items()):
                    if event_id in found:
                        result.visibility.append(now - acked[index])
                        del pending[index]
            if stop.is_set():
                deadline = deadline or time.time() + 30
                if (not pending and not ids) or time.time() > deadline:
                    break
            await asyncio.sleep(0.005)
        result.visibility_missing = len(pending)
    finally:
        await conn.close()


async def _drive(port: int, requests: list[bytes], concurrency: int,
                 visibility: tuple[str, dict[int, str]] | None,
                 pace: float | None = None) -> Result:
    result = Result()
    queue = list(enumerate(requests))[::-1]
    acked: dict[int, float] | None = {} if visibility else None
    stop = asyncio.Event()
    watcher = None
    if visibility is not None and acked is not None:
        watcher = asyncio.create_task(_watch_visibility(visibility[0], dict(visibility[1]),
                                                        acked, result, stop))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(_one_connection(port, queue, result, acked, pace, started)
                           for _ in range(concurrency)))
    result.wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stop.set()
    if watcher is not None:
        await watcher
    return result


def _child(port: int, requests: list[bytes], concurrency: int,
           visibility: tuple[str, dict[int, str]] | None, pace: float | None,
           out: Any) -> None:
    out.send(asyncio.run(_drive(port, requests, concurrency, visibility, pace)))


def run(port: int, requests: list[bytes], concurrency: int = 64,
        visibility: tuple[str, dict[int, str]] | None = None,
        pace: float | None = None) -> Result:
    """Send every request with ``concurrency`` connections from a separate process; with
    ``pace``, at that many requests per second."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(port, requests, concurrency, visibility, pace,
                                            child))
    proc.start()
    result: Result = parent.recv()
    proc.join()
    return result


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
