"""Warehouses: `warehouse.created`, `warehouse.updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="warehouse",
    table="warehouses",
    list_path="/wms/warehouses",
    walk_order=10,
    events=("warehouse.created", "warehouse.updated"),
    columns=(Column("name"), Column("code")),
)
