"""Products: `product.created`, `product.updated`."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="product",
    table="products",
    list_path="/wms/products",
    walk_order=50,
    events=("product.created", "product.updated"),
    columns=(
        Column("sku"),
        Column("name"),
        Column("gtin"),
        Column("unit_price", "numeric"),
        Column("is_kit", "boolean"),
        Column("active", "boolean"),
        Column("warehouse_customer_id"),
    ),
)
