"""Warehouses: `warehouse.created`, `warehouse.updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="warehouse",
    table="warehouses",
    events=("warehouse.created", "warehouse.updated"),
    columns=(Column("name"), Column("code")),
)
