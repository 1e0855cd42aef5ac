"""The REST side's declarations: list endpoints declared by each resource, the walk order,
the synthetic deletion every resource accepts, and where the API key may go."""

from __future__ import annotations

import pytest

from mirror.trackstar.client import origin_of
from mirror.trackstar.listing import select_resources
from projections import registry
from projections.base import Resource


def test_every_resource_declares_its_list_endpoint() -> None:
    with pytest.raises(TypeError, match="list_path"):
        Resource(name="thing", table="things", events=("thing.created",))  # type: ignore[call-arg]
    listed = {r.name: r.list_path for r in registry.listed()}
    assert listed == {
        "warehouse": "/wms/warehouses",
        "warehouse_location": "/wms/warehouses/{parent_id}/locations",
        "warehouse_customer": "/wms/warehouse-customers",
        "shipping_method": "/wms/shipping-methods", "product": "/wms/products",
        "inventory": "/wms/inventory", "order": "/wms/orders",
        "inbound_shipment": "/wms/inbound-shipments", "return": "/wms/returns",
        "bill": "/wms/billing"}
    assert {r.name for r in registry.resources()} - set(listed) == {"connection",
                                                                    "connection_error"}


def test_backfill_walks_what_others_refer_to_first() -> None:
    names = [r.name for r in select_resources(None)]
    assert names[:2] == ["warehouse", "warehouse_location"]
    assert names.index("product") < names.index("inventory") < names.index("order")
    assert [r.name for r in select_resources(["order", "warehouse"])] == ["warehouse", "order"]


def test_a_path_with_a_parent_placeholder_needs_a_parent() -> None:
    with pytest.raises(ValueError, match="parent_id"):
        Resource(name="bin", table="bins", events=("bin.created",),
                 list_path="/wms/warehouses/{parent_id}/bins")
    with pytest.raises(ValueError, match="list_path"):
        Resource(name="bin", table="bins", events=("bin.created",), list_path="wms/bins")


def test_every_resource_routes_its_own_deletion() -> None:
    for resource in registry.resources():
        kind = resource.name.replace("_", "-") + ".deleted"
        assert registry.for_event(kind) is resource
        assert kind in resource.deletes
    assert registry.for_event("inbound_shipment.deleted") is registry.by_name("inbound_shipment")
    # The deletions Trackstar itself sends are still the only ones for those resources.
    assert registry.by_name("connection").deletes == ("connection.deleted",)  # type: ignore[union-attr]


@pytest.mark.parametrize(("url", "same"), [
    ("https://production.trackstarhq.com/webhooks/events/1/data", True),
    ("HTTPS://Production.TrackstarHQ.com:443/x", True),
    ("http://production.trackstarhq.com/x", False),
    ("https://production.trackstarhq.com:8443/x", False),
    ("https://production.trackstarhq.com@evil.example/x", False),
    ("https://evil.example/?https://production.trackstarhq.com", False),
    ("https://production.trackstarhq.com.evil.example/x", False),
    ("ftp://production.trackstarhq.com/x", False),
    ("not a url", False),
    ("https://production.trackstarhq.com:99999/x", False),
])
def test_the_api_key_goes_only_to_the_configured_origin(url: str, same: bool) -> None:
    assert (origin_of(url) == origin_of("https://production.trackstarhq.com")) is same
