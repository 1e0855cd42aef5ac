"""mirror: a queryable, time-travelling PostgreSQL mirror of Trackstar webhooks.

running it:
  up               local run: embedded PostgreSQL and generated secrets unless set
  serve            the service: webhook ingress, read API, explorer, projection workers
  project          projection workers only (more of them, or on other machines)
  migrate          apply the schema (idempotent)

reading it:
  status           log size, lag, anomalies, unprojectable events, the read replica
  as-of            an object's state at a time (JSON)
  history          every version of an object
  rebuild          fold projections again from the log

the Trackstar REST API:
  backfill         append every object the API lists as snapshot events (resumable)
  fetch-truncated  complete truncated deliveries through their data_url
  reconcile        compare current state with the API, and repair the drift

trying it:
  send-sample      sign and post a sample event

Settings come from the environment (the README's Variables table); `mirror COMMAND --help`
shows a command's options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from mirror import logging_setup, settings
from mirror.db import connect, connect_for_reading, replica_lag
from mirror.errors import DatabaseUnavailable, MirrorError, UnknownResource
from mirror.settings import Settings, ensure_local_secrets, masked_url, primary_url
from projections import registry

T = TypeVar("T")


def database_url(env: Mapping[str, str] | None = None) -> str:
    """DATABASE_URL, or else the embedded server under MIRROR_DATA_DIR (started if needed).

    A URL naming several hosts reaches only the primary among them (see ``primary_url``).
    """
    env = os.environ if env is None else env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return primary_url(url)
    from mirror import embedded

    _server, url = embedded.start(settings.data_dir(env).resolve() / "pg")
    os.environ["DATABASE_URL"] = url
    return url


def _local_env() -> dict[str, Path]:
    """For `up`: load generated secrets into the environment unless the user set them."""
    files = ensure_local_secrets(settings.data_dir(os.environ))
    used: dict[str, Path] = {}
    for name, path in files.items():
        if not os.environ.get(name):
            os.environ[name] = path.read_text().strip()
            used[name] = path
    return used


def _reading() -> Any:
    """A read-only connection: the read replica if set and reachable, else the primary."""

    def warn(message: str) -> None:
        print(f"mirror: {message}", file=sys.stderr)

    return connect_for_reading(settings.read_database_url(os.environ), database_url, warn=warn)


def run_on_connection(work: Callable[[asyncpg.Connection], Awaitable[T]], *,
                      reading: bool = False, migrate_first: bool = False,
                      timeout: float = 30.0) -> T:
    """``work(conn)`` on one connection, in a fresh event loop: to the primary (DATABASE_URL,
    or the embedded server), after applying the schema if ``migrate_first``; or, ``reading``,
    a read-only one to the read replica when it answers."""
    if reading:
        async def run() -> T:
            async with _reading() as conn:
                return await work(conn)

        return asyncio.run(run())
    url = database_url()

    async def run_primary() -> T:
        if migrate_first:
            from mirror.processes import apply_schema

            await apply_schema(url)
        async with connect(url, timeout=timeout) as conn:
            return await work(conn)

    return asyncio.run(run_primary())


def cmd_migrate(args: argparse.Namespace) -> int:
    from mirror.processes import apply_schema

    url = database_url()
    asyncio.run(apply_schema(url))
    print(f"schema applied to {masked_url(url)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mirror.processes import serve

    return serve(Settings.from_env(database_url=database_url()), project=not args.no_projector)


def cmd_up(args: argparse.Namespace) -> int:
    from mirror.processes import serve

    used = _local_env()
    return serve(Settings.from_env(database_url=database_url()), secret_files=used)


def cmd_project(args: argparse.Namespace) -> int:
    from mirror.processes import project

    config = Settings.from_env(database_url=database_url(), require_secrets=False)
    return project(config, workers=args.workers or config.workers,
                   migrate_first=not args.no_migrate)


async def _read_replica_status(url: str | None) -> dict[str, Any]:
    if url is None:
        return {"status": "not configured", "reads": "primary"}
    try:
        async with connect(url, read_only=True) as conn:
            return {"status": "ok", **await replica_lag(conn), "reads": "replica"}
    except DatabaseUnavailable as exc:
        return {"status": "unreachable", "error": str(exc),
                "reads": "primary (fallback while the replica is unreachable)"}


def _render_replica(replica: dict[str, Any]) -> str:
    if replica["status"] == "not configured":
        return "read replica:         none (reads go to the primary)"
    if replica["status"] == "unreachable":
        return "read replica:         unreachable: reads fall back to the primary"
    role = "standby" if replica["in_recovery"] else "not a standby"
    return f"read replica:         {role}, replay lag {replica['lag_seconds']} s"


def cmd_status(args: argparse.Namespace) -> int:
    from mirror.status import gather
    from mirror.trackstar import completion

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        report = await gather(conn)
        report["truncated_deliveries"] = await completion.counts(conn)
        report["truncated_failures"] = await completion.failures(conn)
        report["read_replica"] = await _read_replica_status(
            settings.read_database_url(os.environ))
        return report

    report = run_on_connection(work, timeout=5.0)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from mirror.status import render

        print(render(report))
        print("\n".join(completion.render_counts(report["truncated_deliveries"],
                                                 report["truncated_failures"])))
        print(_render_replica(report["read_replica"]))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from mirror.rebuild import rebuild

    resource = None
    if args.resource:
        found = registry.by_name(args.resource)
        if found is None:
            raise UnknownResource(args.resource)
        resource = found.name
    counts = run_on_connection(lambda conn: rebuild(conn, resource))
    for name, count in counts.items():
        print(f"{name}: {count} objects rebuilt")
    return 0


def cmd_send_sample(args: argparse.Namespace) -> int:
    from mirror.sample import send_sample

    raw = os.environ.get("MIRROR_WEBHOOK_SECRET", "")
    if not raw.strip():
        path = settings.data_dir(os.environ) / "webhook_secret"
        if not path.exists():
            raise MirrorError("MIRROR_WEBHOOK_SECRET is not set and no local secret exists "
                              "yet (run make up first)")
        raw = path.read_text()
    secret = settings.parse_webhook_secrets(raw)[0]
    url = args.url or settings.webhook_url(*settings.listen_address(os.environ))
    status, body, event = asyncio.run(send_sample(url, secret, args.event_type, args.id))
    print(f"sent {event['event_type']} for {event['data'].get('id')} → HTTP {status} {body}")
    return 0 if 200 <= status < 300 else 1


def _parse_time_arg(raw: str | None, name: str) -> datetime | None:
    from projections.base import parse_time

    if raw is None:
        return None
    if raw == "now":
        return datetime.now(UTC)
    parsed = parse_time(raw)
    if parsed is None:
        raise MirrorError(f"{name} must be an ISO 8601 time (or 'now'), got {raw!r}")
    return parsed


def cmd_as_of(args: argparse.Namespace) -> int:
    from mirror.history import object_as_of

    at = _parse_time_arg(args.at, "--at")
    known_at = _parse_time_arg(args.known_at, "--known-at")
    assert at is not None
    _connection, data = run_on_connection(
        lambda conn: object_as_of(conn, args.resource, args.id, at, args.connection_id,
                                  known_at), reading=True)
    if data is None:
        print(f"mirror: no state for {args.resource} {args.id} at {at.isoformat()}",
              file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from mirror.history import object_history

    versions = run_on_connection(
        lambda conn: object_history(conn, args.resource, args.id, args.connection_id),
        reading=True)
    if not versions:
        print(f"mirror: no history for {args.resource} {args.id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(versions, indent=2, sort_keys=True))
        return 0
    for v in versions:
        flag = " (derived)" if v["derived"] else ""
        state = "deleted" if v["data"] is None else json.dumps(v["data"], sort_keys=True)
        print(f"{v['valid_from']} .. {v['valid_to'] or 'now'}  {v['event_type']}{flag}")
        print(f"    {state}")
    return 0


def _with_trackstar(args: argparse.Namespace,
                    work: Callable[[asyncpg.Connection, Any], Awaitable[T]], *,
                    need_access_token: bool = True, migrate_first: bool = False) -> T:
    """``work(conn, client)`` with a Trackstar API client (MIRROR_TRACKSTAR_* settings)."""
    from mirror.trackstar.client import ApiSettings, TrackstarClient

    api = ApiSettings.from_env(os.environ, access_token=getattr(args, "access_token", None),
                               need_access_token=need_access_token)

    async def with_client(conn: asyncpg.Connection) -> T:
        async with TrackstarClient(api) as client:
            return await work(conn, client)

    return run_on_connection(with_client, migrate_first=migrate_first)


def cmd_backfill(args: argparse.Namespace) -> int:
    from mirror.trackstar.backfill import backfill, render_results

    since = _parse_time_arg(args.since, "--since")
    results = _with_trackstar(args, lambda conn, client: backfill(
        conn, client, args.connection_id, resources=args.resource, since=since,
        page_size=args.page_size, progress=sys.stderr), migrate_first=True)
    print(render_results(results))
    appended = sum(r.appended for r in results)
    print(f"{appended:,} new events appended; the projection workers (mirror serve or "
          "mirror project) fold them into the current-state tables")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_fetch_truncated(args: argparse.Namespace) -> int:
    from mirror.trackstar.completion import fetch_truncated

    results = _with_trackstar(args, lambda conn, client: fetch_truncated(
        conn, client, connection_id=args.connection_id, limit=args.limit),
        need_access_token=False)
    for result in results:
        suffix = f": {result.message}" if result.message else ""
        print(f"{result.event_id}: {result.status}{suffix}")
    fetched = sum(1 for r in results if r.status == "fetched")
    print(f"{len(results)} truncated deliveries, {fetched} completed")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from mirror.trackstar.reconcile import as_json, reconcile, render

    reports = _with_trackstar(args, lambda conn, client: reconcile(
        conn, client, args.connection_id, resources=args.resource, repair=args.repair,
        page_size=args.page_size), migrate_first=True)
    if args.json:
        print(json.dumps(as_json(reports), indent=2, default=str))
    else:
        print(render(reports, repair=args.repair))
    standing = any(r.status == "failed" or r.unrepaired for r in reports)
    return 1 if standing else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands above")
    sub.add_parser("up", description="local run: embedded PostgreSQL and generated secrets if unset"
                   ).set_defaults(func=cmd_up)
    serve = sub.add_parser("serve", description="run the ingress and projection workers")
    serve.add_argument("--no-projector", action="store_true",
                       help="ingress only (run `mirror project` elsewhere)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", description="apply the schema (idempotent)"
                   ).set_defaults(func=cmd_migrate)
    project = sub.add_parser("project", description="run projection workers only")
    project.add_argument("--workers", type=int, default=None,
                         help="worker tasks in this process (default: MIRROR_WORKERS, 1)")
    project.add_argument("--no-migrate", action="store_true",
                         help="do not apply the schema first (mirror serve already did)")
    project.set_defaults(func=cmd_project)
    status = sub.add_parser("status", description="log size, lag, anomalies, unprojectable events")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    rebuild = sub.add_parser("rebuild", description="re-fold projections from the log")
    rebuild.add_argument("resource", nargs="?", help="one resource (default: all)")
    rebuild.set_defaults(func=cmd_rebuild)
    as_of = sub.add_parser("as-of", description="an object's state at a time (JSON)")
    as_of.add_argument("resource")
    as_of.add_argument("id")
    as_of.add_argument("--at", required=True, help="ISO 8601 time, or 'now'")
    as_of.add_argument("--known-at", default=None, help="count only events received by then")
    as_of.add_argument("--connection-id", default=None)
    as_of.set_defaults(func=cmd_as_of)
    hist = sub.add_parser("history", description="every version of an object")
    hist.add_argument("resource")
    hist.add_argument("id")
    hist.add_argument("--connection-id", default=None)
    hist.add_argument("--json", action="store_true")
    hist.set_defaults(func=cmd_history)
    sample = sub.add_parser("send-sample", description="sign and post a sample event")
    sample.add_argument("--url", default=None,
                        help="webhook URL (default: from MIRROR_HOST and MIRROR_PORT)")
    sample.add_argument("--event-type", default="order.created")
    sample.add_argument("--id", default=None, help="object id (default: random)")
    sample.set_defaults(func=cmd_send_sample)
    token_help = ("the connection's access token (default: MIRROR_TRACKSTAR_ACCESS_TOKEN, "
                  "which keeps it out of the process list); never stored or logged")
    fill = sub.add_parser("backfill", description="append every object the Trackstar API lists as "
                          "snapshot events (resumable)")
    fill.add_argument("--connection-id", required=True)
    fill.add_argument("--resource", action="append", default=None,
                      help="a resource to backfill (repeatable; default: all)")
    fill.add_argument("--since", default=None,
                      help="only objects updated at or after this ISO 8601 time")
    fill.add_argument("--access-token", default=None, help=token_help)
    fill.add_argument("--page-size", type=int, default=1000, help="objects per page (max 1000)")
    fill.set_defaults(func=cmd_backfill)
    fetch = sub.add_parser("fetch-truncated", description="complete truncated deliveries through "
                           "their data_url (needs MIRROR_TRACKSTAR_API_KEY)")
    fetch.add_argument("--connection-id", default=None, help="only this connection")
    fetch.add_argument("--limit", type=int, default=1000)
    fetch.set_defaults(func=cmd_fetch_truncated)
    rec = sub.add_parser("reconcile", description="compare current state with the Trackstar API; "
                         "--repair appends what is missing or newer and deletes what a "
                         "complete listing no longer holds")
    rec.add_argument("--connection-id", required=True)
    rec.add_argument("--resource", action="append", default=None,
                     help="a resource to compare (repeatable; default: all)")
    rec.add_argument("--repair", action="store_true",
                     help="append snapshot and deletion events (origin reconcile) and "
                     "record the drift")
    rec.add_argument("--json", action="store_true")
    rec.add_argument("--access-token", default=None, help=token_help)
    rec.add_argument("--page-size", type=int, default=1000, help="objects per page (max 1000)")
    rec.set_defaults(func=cmd_reconcile)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mirror` command."""
    args = build_parser().parse_args(argv)
    try:
        logging_setup.setup(settings.log_level(os.environ))
        result: int = args.func(args)
        return result
    except MirrorError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("stopped", file=sys.stderr)
        return 130
