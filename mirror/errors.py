"""The small error vocabulary of the mirror.

Database errors are translated into these at the database edge (mirror/db.py). Over HTTP,
one middleware (mirror/middleware.py) maps them to statuses; on the command line, `mirror`
prints the message and exits 2.
"""


class MirrorError(Exception):
    """Base class of every error the mirror raises on purpose."""


class ConfigError(MirrorError):
    """A setting is missing or malformed; the message names the variable."""


class DatabaseUnavailable(MirrorError):
    """PostgreSQL cannot be reached (or did not answer in time); callers may retry later."""


class VerificationFailed(MirrorError):
    """A webhook delivery is not authentic; the message is a short reason safe to return."""


class NotFound(MirrorError):
    """The requested object or resource does not exist."""


class BadRequest(MirrorError):
    """A request parameter is malformed; the message says which."""


class UnknownResource(BadRequest):
    """A resource name the registry does not know (from a URL, a query or the command line)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown resource {name[:64]!r}")
        self.name = name


class AmbiguousObject(MirrorError):
    """An id exists in several connections and no connection_id was given."""


class Conflict(MirrorError):
    """Another worker moved what this one was about to move (a checkpoint); it retries."""
