"""Warehouse customers: `warehouse-customer.created/updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="warehouse_customer",
    table="warehouse_customers",
    events=("warehouse-customer.created", "warehouse-customer.updated"),
    columns=(Column("name"),),
)
