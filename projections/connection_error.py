"""Connection errors: `connection-error.created/updated/deleted`, keyed by `data.failed_url`
(errors carry no id). `.deleted` means the error was resolved."""

from projections.base import Column, Resource

RESOURCE = Resource(
    name="connection_error",
    table="connection_errors",
    list_path=None,  # not listed by the REST API: webhooks only
    events=("connection-error.created", "connection-error.updated", "connection-error.deleted"),
    key="data.failed_url",
    deletes=("connection-error.deleted",),
    columns=(
        Column("failed_url"),
        Column("integration_name"),
        Column("error_message"),
        Column("last_seen", "timestamptz"),
        Column("affected_endpoints", "jsonb"),
    ),
)
