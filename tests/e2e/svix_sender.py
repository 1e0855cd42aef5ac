"""A steady, signed load that behaves like Svix, as its own process (it runs on a host of the
multi-host rig):

    MIRROR_WEBHOOK_SECRET=... python -m tests.e2e.svix_sender URL RATE SECONDS OUT_DIR

Starts ``RATE`` new messages a second for ``SECONDS`` seconds: orders (created, then updated
with ``previous_attributes``) and inventory items, for a few connections. Each message is
delivered until it is acknowledged (2xx): a non-2xx answer, a refused or reset connection and a
timeout (5 s) are retried with backoff, under the same svix-id and a fresh signature, as Svix
does; a few acknowledged messages are delivered once more (an acknowledgement Svix never saw).
A message still unacknowledged after 150 s is given up.

Writes ``OUT_DIR/sent`` (every svix-id it ever sent) and ``OUT_DIR/acked`` (the acknowledged
ones) as it goes, prints ``ready`` after the first acknowledgement and one JSON line at the end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from mirror.sample import message_id, signed_headers

GIVE_UP_SECONDS = 150.0
TIMEOUT_SECONDS = 5.0
BACKOFF = (0.2, 0.5, 1.0, 2.0)
CONNECTIONS = ("conn_mh_a", "conn_mh_b", "conn_mh_c")
STATUSES = ("open", "picked", "packed", "shipped")
BASE = datetime(2025, 6, 1, tzinfo=UTC)


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


class Workload:
    """The n-th message of a repeatable stream of Trackstar events."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.orders: dict[tuple[str, str], tuple[int, str]] = {}  # version, status
        self.stock: dict[tuple[str, str], int] = {}

    def next(self, n: int) -> dict[str, Any]:
        rng = self.rng
        connection = rng.choice(CONNECTIONS)
        at = BASE + timedelta(seconds=n)
        if rng.random() < 0.6:
            order_id = f"ord_{rng.randrange(400)}"
            key = (connection, order_id)
            line = [{"product_id": "p_1", "sku": "SKU-1", "quantity": 1 + n % 3,
                     "unit_price": 9.5, "is_picked": False}]
            data = {"id": order_id, "order_number": f"SO-{order_id}", "created_date": iso(BASE),
                    "updated_date": iso(at), "warehouse_id": "wh_1", "line_items": line,
                    "shipments": []}
            if key not in self.orders:
                self.orders[key] = (0, "open")
                return self._envelope(connection, "order.created", {**data, "status": "open"})
            version, status = self.orders[key]
            new = STATUSES[(version + 1) % len(STATUSES)]
            self.orders[key] = (version + 1, new)
            return self._envelope(connection, "order.updated", {**data, "status": new},
                                  previous={"status": status})
        item_id = f"inv_{rng.randrange(200)}"
        onhand = self.stock.get((connection, item_id), 0) + rng.randrange(1, 9)
        self.stock[(connection, item_id)] = onhand
        return self._envelope(connection, "inventory.updated", {
            "id": item_id, "sku": f"SKU-{item_id}", "onhand": onhand, "updated_date": iso(at)})

    @staticmethod
    def _envelope(connection: str, event_type: str, data: dict[str, Any],
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
        env: dict[str, Any] = {"connection_id": connection, "integration_name": "sandbox",
                               "integration_type": "wms", "event_type": event_type,
                               "data": data}
        if previous is not None:
            env["previous_attributes"] = previous
        return env


async def main(url: str, rate: float, seconds: float, out_dir: Path) -> None:
    secret = os.environ["MIRROR_WEBHOOK_SECRET"]
    workload = Workload(int(os.environ.get("SENDER_SEED", "12")))
    rng = random.Random(7)
    counts: collections.Counter[str] = collections.Counter()
    sent_file = open(out_dir / "sent", "a", buffering=1)
    acked_file = open(out_dir / "acked", "a", buffering=1)
    acked = 0
    gave_up = 0

    async def deliver(session: aiohttp.ClientSession, body: str, msg_id: str) -> None:
        nonlocal acked, gave_up
        sent_file.write(msg_id + "\n")
        started = time.monotonic()
        attempt = 0
        again = rng.random() < 0.03  # this one's acknowledgement "gets lost": sent once more
        while True:
            attempt += 1
            counts["attempts"] += 1
            try:
                async with session.post(url, data=body.encode(),
                                        headers=signed_headers(secret, body, msg_id)) as answer:
                    await answer.read()
                    status = str(answer.status)
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            counts[status] += 1
            if status.startswith("2"):
                if again:
                    again = False
                    continue
                acked += 1
                acked_file.write(msg_id + "\n")
                if acked == 1:
                    print("ready", flush=True)
                return
            if time.monotonic() - started > GIVE_UP_SECONDS:
                gave_up += 1
                return
            await asyncio.sleep(BACKOFF[min(attempt - 1, len(BACKOFF) - 1)]
                                * rng.uniform(0.8, 1.2))

    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=64)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        n = 0
        while time.monotonic() - started < seconds:
            due = started + n / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            body = orjson.dumps(workload.next(n)).decode()
            tasks.append(asyncio.create_task(deliver(session, body, message_id())))
            n += 1
        await asyncio.gather(*tasks)
    sent_file.close()
    acked_file.close()
    print(json.dumps({"messages": n, "acked": acked, "gave_up": gave_up,
                      "seconds": round(time.monotonic() - started, 1),
                      "answers": dict(counts)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])))
