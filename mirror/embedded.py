"""An embedded PostgreSQL under ./.data/ for machines without a server (pgserver's binaries)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


def start(pgdata: Path, *, keep_running: bool = False) -> tuple[Any, str]:
    """Start (or reuse) the server in ``pgdata``; return it and a URL of database ``mirror``.

    Without ``keep_running`` the server stops when the last process using it exits.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(  # type: ignore[attr-defined]
        pgdata, cleanup_mode=None if keep_running else "stop")
    exists = server.psql("SELECT 1 FROM pg_database WHERE datname = 'mirror';")
    if "(1 row)" not in exists:
        server.psql("CREATE DATABASE mirror;")
    return server, server.get_uri("mirror")
