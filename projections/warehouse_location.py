"""Warehouse locations: `warehouse-location.created/updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="warehouse_location",
    table="warehouse_locations",
    list_path="/wms/warehouses/{parent_id}/locations",
    list_parent="warehouse",
    walk_order=20,
    events=("warehouse-location.created", "warehouse-location.updated"),
    columns=(Column("name"), Column("warehouse_id"), Column("type")),
)
