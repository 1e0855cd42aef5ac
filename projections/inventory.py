"""Inventory items: `inventory.created`, `inventory.updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="inventory",
    table="inventory_items",
    list_path="/wms/inventory",
    walk_order=60,
    events=("inventory.created", "inventory.updated"),
    columns=(
        Column("sku"),
        Column("name"),
        Column("active", "boolean"),
        Column("unit_cost", "numeric"),
        Column("onhand", "numeric"),
        Column("awaiting", "numeric"),
        Column("committed", "numeric"),
        Column("fulfillable", "numeric"),
        Column("unfulfillable", "numeric"),
        Column("sellable", "numeric"),
        Column("warehouse_customer_id"),
    ),
)
