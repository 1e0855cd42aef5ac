"""The operator commands as a user runs them: mirror migrate, status and rebuild."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg

from tests.logtools import append, project_all, snapshot
from tests.signing import envelope


def mirror(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "MIRROR_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "mirror", *args], env=env,
                          capture_output=True, text=True, timeout=120)


async def test_migrate_twice_changes_nothing(db_url: str, conn: asyncpg.Connection) -> None:
    await append(conn, envelope("order.created", {"id": "o1", "updated_date":
                                                  "2025-01-01T00:00:00Z"}))
    before = await conn.fetchval("SELECT count(*) FROM mirror.events")
    for _ in range(2):
        out = mirror(db_url, "migrate")
        assert out.returncode == 0, out.stderr
        assert "***" in out.stdout or "schema applied" in out.stdout
    assert await conn.fetchval("SELECT count(*) FROM mirror.events") == before


async def test_status_reports_log_lag_and_unknown_types(db_url: str,
                                                        conn: asyncpg.Connection) -> None:
    await append(conn, envelope("order.created", {"id": "o1"}),
                 envelope("install.failed", {"id": "x"}))
    out = mirror(db_url, "status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["events"] == 2 and report["projection_lag_events"] == 2
    assert report["unknown_event_types"] == {"install.failed": 1}
    await project_all(conn)
    text = mirror(db_url, "status").stdout
    assert "events stored:        2" in text and "projection lag:       0 events" in text
    assert "install.failed" in text


async def test_rebuild_command_reproduces_live_relations(db_url: str,
                                                         conn: asyncpg.Connection) -> None:
    events = [envelope("product.created", {"id": f"p{i}", "sku": f"S{i}",
                                           "updated_date": "2025-01-01T00:00:00Z"})
              for i in range(5)]
    await append(conn, *events)
    await project_all(conn)
    live = await snapshot(conn)
    out = mirror(db_url, "rebuild", "product")
    assert out.returncode == 0, out.stderr
    assert "product: 5 objects rebuilt" in out.stdout
    assert await snapshot(conn) == live
    bad = mirror(db_url, "rebuild", "nope")
    assert bad.returncode == 2 and "unknown resource" in bad.stderr
