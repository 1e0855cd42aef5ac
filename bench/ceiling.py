"""The verify-only ceiling: the mirror's own app and handler with the database write removed
(the appender answers at once). What the ingress could do if storage were free.

Run: python -m bench.ceiling PORT DSN SECRET
"""

from __future__ import annotations

import sys

from aiohttp import web

from mirror.app import create_app
from mirror.eventlog import Record
from mirror.keys import APPENDER
from mirror.settings import Settings


class NoStore:
    """Stands in for the group-commit appender: every record is 'new', nothing is written."""

    async def append(self, record: Record) -> bool:
        return True

    async def close(self) -> None:
        return None


def make_app(dsn: str, secret: str) -> web.Application:
    settings = Settings(database_url=dsn, webhook_secrets=(secret,), api_token="x" * 32)
    app = create_app(settings, project=False)

    async def swap(app: web.Application) -> None:
        app[APPENDER] = NoStore()  # type: ignore[assignment]

    app.on_startup.append(swap)
    return app


if __name__ == "__main__":
    port, dsn, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    web.run_app(make_app(dsn, secret), host="127.0.0.1", port=port, print=None,
                access_log=None)
