"""Warehouse customers: `warehouse-customer.created/updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="warehouse_customer",
    table="warehouse_customers",
    list_path="/wms/warehouse-customers",
    walk_order=30,
    events=("warehouse-customer.created", "warehouse-customer.updated"),
    columns=(Column("name"),),
)
