"""Inbound shipments: `inbound-shipment.created/updated` and `inbound-shipment.receipt.created`
(data is the whole shipment)."""

from projections.base import Child, Column, Resource

RESOURCE = Resource(
    name="inbound_shipment",
    table="inbound_shipments",
    list_path="/wms/inbound-shipments",
    walk_order=80,
    events=(
        "inbound-shipment.created",
        "inbound-shipment.updated",
        "inbound-shipment.receipt.created",
    ),
    columns=(
        Column("status"),
        Column("purchase_order_number"),
        Column("warehouse_id"),
        Column("warehouse_customer_id"),
        Column("expected_arrival_date", "timestamptz"),
    ),
    children=(
        Child(
            table="inbound_shipment_line_items",
            array="line_items",
            parent_column="inbound_shipment_id",
            columns=(
                Column("inventory_item_id"),
                Column("sku"),
                Column("expected_quantity", "numeric"),
                Column("received_quantity", "numeric"),
                Column("unit_cost", "numeric"),
            ),
        ),
        Child(
            table="inbound_shipment_receipts",
            array="receipts",
            parent_column="inbound_shipment_id",
            columns=(
                Column("receipt_id", "text", ("id",)),
                Column("arrived_date", "timestamptz"),
            ),
        ),
    ),
)
