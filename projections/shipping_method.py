"""Shipping methods: `shipping-method.created/updated` (also spelled `shipping_method.*`)."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="shipping_method",
    table="shipping_methods",
    list_path="/wms/shipping-methods",
    walk_order=40,
    events=("shipping-method.created", "shipping-method.updated"),
    columns=(Column("name"), Column("carrier_id"), Column("carrier_name"), Column("scac")),
)
