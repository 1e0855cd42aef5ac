"""A flood of unauthenticated webhook requests, as its own process (so it does not share an
event loop, or a core, with the client whose latency a test measures).

    python -m tests.e2e.flood URL CONNECTIONS

Floods until its stdin closes (at most 120 s), printing ``ready`` once the first answers are
in, then one JSON line: answers by status and the request rate.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import sys
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson

from mirror.sample import message_id, signed_headers

FORGED_SECRET = "whsec_" + base64.b64encode(b"not-the-secret-of-this-endpoint").decode()
MAX_SECONDS = 120.0


def forged(n: int) -> tuple[bytes, dict[str, str]]:
    """The n-th forged request: every kind of unauthenticated delivery in turn."""
    body = orjson.dumps({"connection_id": "conn_flood", "integration_name": "sandbox",
                         "event_type": "order.created",
                         "data": {"id": f"flood_{n}", "status": "open", "note": "x" * 800}})
    kind = n % 5
    if kind == 0:  # signed with another secret: the server has to compute the HMAC
        return body, signed_headers(FORGED_SECRET, body.decode())
    if kind == 1:  # no Svix headers at all
        return body, {"content-type": "application/json"}
    if kind == 2:  # a stale timestamp
        return body, signed_headers(FORGED_SECRET, body.decode(),
                                    at=datetime.now(UTC) - timedelta(minutes=10))
    if kind == 3:  # garbage signature
        return body, {"svix-id": message_id(), "svix-timestamp": str(int(time.time())),
                      "svix-signature": "v1,garbage"}
    headers = signed_headers(FORGED_SECRET, body.decode())  # tampered
    return body.replace(b"open", b"shut"), headers


async def main(url: str, connections: int) -> None:
    statuses: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    started = time.monotonic()

    async def worker(session: aiohttp.ClientSession, offset: int) -> None:
        n = offset
        while not stop.is_set() and time.monotonic() - started < MAX_SECONDS:
            body, headers = forged(n)
            n += connections
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                statuses[type(exc).__name__] += 1
            if sum(statuses.values()) == 200:
                print("ready", flush=True)

    async def wait_for_stdin_close() -> None:
        await asyncio.to_thread(sys.stdin.read)
        stop.set()

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        watcher = asyncio.create_task(wait_for_stdin_close())
        await asyncio.gather(*(worker(session, i) for i in range(connections)))
        watcher.cancel()
    elapsed = time.monotonic() - started
    print(json.dumps({"statuses": dict(statuses),
                      "rate": round(sum(statuses.values()) / elapsed, 1)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
