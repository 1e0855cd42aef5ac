"""Warehouse locations: `warehouse-location.created/updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="warehouse_location",
    table="warehouse_locations",
    events=("warehouse-location.created", "warehouse-location.updated"),
    columns=(Column("name"), Column("warehouse_id"), Column("type")),
)
