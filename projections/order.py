"""Orders: `order.created`, `order.updated`, `order.shipment.created` (data is the whole order)."""

from projections.base import Child, Column, Resource

RESOURCE = Resource(
    name="order",
    table="orders",
    list_path="/wms/orders",
    walk_order=70,
    events=("order.created", "order.updated", "order.shipment.created"),
    columns=(
        Column("order_number"),
        Column("reference_id"),
        Column("status"),
        Column("raw_status"),
        Column("type"),
        Column("warehouse_id"),
        Column("warehouse_customer_id"),
        Column("shipping_method_id"),
        Column("total_price", "numeric"),
    ),
    children=(
        Child(
            table="order_line_items",
            array="line_items",
            parent_column="order_id",
            columns=(
                Column("product_id"),
                Column("sku"),
                Column("quantity", "numeric"),
                Column("unit_price", "numeric"),
                Column("is_picked", "boolean"),
            ),
        ),
        Child(
            table="order_shipments",
            array="shipments",
            parent_column="order_id",
            columns=(
                Column("shipment_id"),
                Column("warehouse_id"),
                Column("status"),
                Column("shipped_date", "timestamptz"),
            ),
        ),
    ),
)
