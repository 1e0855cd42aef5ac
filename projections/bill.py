"""Bills: `bill.created`, `bill.updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="bill",
    table="bills",
    list_path="/wms/billing",
    walk_order=100,
    events=("bill.created", "bill.updated"),
    columns=(
        Column("object_id"),
        Column("object_type"),
        Column("charge_type"),
        Column("amount", "numeric"),
        Column("currency_code"),
    ),
)
