"""A realistic Trackstar workload: mixed resources, creates then updates carrying dotted-path
previous_attributes, some Svix retries (duplicates) and some out-of-order deliveries."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from mirror.paths import diff
from mirror.sample import message_id

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
STATUSES = {
    "order": ["open", "confirmed", "processing", "picked", "packed", "fulfilled"],
    "inbound_shipment": ["open", "in-transit", "receiving", "received"],
    "return": ["open", "received", "processing", "closed"],
}


@dataclass(frozen=True)
class Delivery:
    """One webhook attempt: the svix id (stable across retries) and the JSON body."""

    msg_id: str
    body: str
    object_id: str
    resource: str


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _initial(resource: str, n: int, rng: random.Random, at: datetime) -> dict[str, Any]:
    base: dict[str, Any] = {"id": f"{resource[:3]}_{n}", "created_date": _iso(at),
                            "updated_date": _iso(at), "warehouse_customer_id": "wc_1",
                            "trackstar_tags": [], "additional_fields": {}}
    if resource == "order":
        base.update(order_number=f"SO-{n}", status="open", warehouse_id="wh_1", type="d2c",
                    ship_to_address={"name": "A Person", "city": "Berlin", "country": "DE"},
                    line_items=[{"product_id": f"p_{rng.randint(1, 500)}",
                                 "sku": f"SKU-{rng.randint(1, 500)}",
                                 "quantity": rng.randint(1, 5), "unit_price": 9.99,
                                 "is_picked": False} for _ in range(rng.randint(1, 4))],
                    shipments=[], tags=[])
    elif resource == "inventory":
        base.update(sku=f"SKU-{n}", name=f"Item {n}", onhand=rng.randint(0, 500), committed=0,
                    fulfillable=0, unfulfillable=0, sellable=0, awaiting=0, active=True,
                    locations=[{"location_id": f"loc_{n}", "quantity": 5, "warehouse_id": "wh_1"}])
    elif resource == "product":
        base.update(sku=f"SKU-{n}", name=f"Product {n}", gtin=str(10**12 + n), unit_price=19.5,
                    is_kit=False, active=True, inventory_items=[])
    elif resource == "inbound_shipment":
        base.update(purchase_order_number=f"PO-{n}", status="open", warehouse_id="wh_1",
                    line_items=[{"inventory_item_id": f"inv_{i}", "sku": f"SKU-{i}",
                                 "expected_quantity": 10, "received_quantity": 0}
                                for i in range(rng.randint(1, 3))], receipts=[])
    else:  # return
        base.update(status="open", order_id=f"ord_{n}",
                    line_items=[{"sku": "SKU-1", "expected_quantity": 1, "received_quantity": 0}])
    return base


def _mutate(resource: str, state: dict[str, Any], rng: random.Random,
            at: datetime) -> dict[str, Any]:
    new = orjson.loads(orjson.dumps(state))
    new["updated_date"] = _iso(at)
    if resource in STATUSES:
        new["status"] = rng.choice(STATUSES[resource])
    if resource == "order" and new["line_items"]:
        new["line_items"][rng.randrange(len(new["line_items"]))]["is_picked"] = True
    elif resource == "inventory":
        new["onhand"] = max(0, new["onhand"] + rng.randint(-5, 5))
        new["fulfillable"] = new["onhand"]
    elif resource == "product":
        new["unit_price"] = round(new["unit_price"] * rng.uniform(0.9, 1.1), 2)
    elif resource == "inbound_shipment":
        line = new["line_items"][rng.randrange(len(new["line_items"]))]
        line["received_quantity"] = min(line["expected_quantity"], line["received_quantity"] + 2)
    return new


_EVENTS = {"order": "order", "inventory": "inventory", "product": "product",
           "inbound_shipment": "inbound-shipment", "return": "return"}
_MIX = [("order", 40), ("inventory", 30), ("product", 10), ("inbound_shipment", 10),
        ("return", 10)]


def generate(total: int, *, seed: int = 1, updates_per_object: int = 4,
             duplicate_rate: float = 0.02, swap_rate: float = 0.02) -> list[Delivery]:
    """About ``total`` deliveries; objects get a create and then updates."""
    rng = random.Random(seed)
    per_object = updates_per_object + 1
    objects = max(1, total // per_object)
    names = [name for name, weight in _MIX for _ in range(weight)]
    streams: list[list[Delivery]] = []
    for n in range(objects):
        resource = rng.choice(names)
        at = T0 + timedelta(seconds=rng.randint(0, 86_400))
        state = _initial(resource, n, rng, at)
        prefix = _EVENTS[resource]
        stream = [_delivery(resource, f"{prefix}.created", state, None, at)]
        for _ in range(updates_per_object):
            at += timedelta(seconds=rng.randint(1, 3600))
            new = _mutate(resource, state, rng, at)
            stream.append(_delivery(resource, f"{prefix}.updated", new, diff(state, new), at))
            state = new
        streams.append(stream)
    # Interleave the objects' streams, keeping each one's order...
    out: list[Delivery] = []
    cursors = [0] * len(streams)
    live = list(range(len(streams)))
    while live:
        i = rng.randrange(len(live))
        s = live[i]
        out.append(streams[s][cursors[s]])
        cursors[s] += 1
        if cursors[s] == len(streams[s]):
            live[i] = live[-1]
            live.pop()
    # ...then disturb it as Svix does: some neighbours swapped, some retried.
    for i in range(len(out) - 1):
        if rng.random() < swap_rate:
            out[i], out[i + 1] = out[i + 1], out[i]
    for _ in range(int(len(out) * duplicate_rate)):
        out.insert(rng.randrange(len(out)), out[rng.randrange(len(out))])
    return out[:total]


def _delivery(resource: str, event_type: str, data: dict[str, Any],
              previous: dict[str, Any] | None, at: datetime) -> Delivery:
    envelope: dict[str, Any] = {"connection_id": "conn_bench", "integration_name": "sandbox",
                                "integration_type": "wms", "event_type": event_type,
                                "data": data}
    if previous is not None:
        envelope["previous_attributes"] = previous
    return Delivery(message_id(at), orjson.dumps(envelope).decode(), data["id"], resource)
