"""The Trackstar REST side: the API client, snapshot events, backfill, completion of truncated
deliveries and reconcile. The list endpoints come from the resources in ``projections/``."""
