"""Returns: `return.created`, `return.updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="return",
    table="returns",
    list_path="/wms/returns",
    walk_order=90,
    events=("return.created", "return.updated"),
    columns=(
        Column("status"),
        Column("order_id"),
        Column("warehouse_id"),
        Column("warehouse_customer_id"),
    ),
)
