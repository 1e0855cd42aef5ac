"""One module per Trackstar resource, plus the registry that finds them."""
