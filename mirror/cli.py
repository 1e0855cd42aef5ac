"""The `mirror` command: serve, up, migrate, status, project, rebuild, send-sample, as-of,
history."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from mirror import logging_setup
from mirror.db import connect, connect_for_reading, migrate, replica_lag
from mirror.errors import DatabaseUnavailable, MirrorError
from mirror.settings import Settings, ensure_local_secrets, masked_url, primary_url

DATA_DIR = Path(os.environ.get("MIRROR_DATA_DIR", ".data"))
log = logging.getLogger("mirror.cli")


def database_url(env: dict[str, str] | None = None) -> str:
    """DATABASE_URL, or else the embedded server under ./.data/ (started if needed).

    A URL naming several hosts reaches only the primary among them (see ``primary_url``).
    """
    env = dict(os.environ) if env is None else env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return primary_url(url)
    from mirror import embedded

    _server, url = embedded.start(DATA_DIR.resolve() / "pg")
    os.environ["DATABASE_URL"] = url
    return url


def _local_env() -> dict[str, Path]:
    """For `up`: load generated secrets into the environment unless the user set them."""
    files = ensure_local_secrets(DATA_DIR)
    used: dict[str, Path] = {}
    for name, path in files.items():
        if not os.environ.get(name):
            os.environ[name] = path.read_text().strip()
            used[name] = path
    return used


async def _migrate(url: str) -> None:
    async with connect(url) as conn:
        await migrate(conn)


def cmd_migrate(args: argparse.Namespace) -> int:
    url = database_url()
    asyncio.run(_migrate(url))
    print(f"schema applied to {masked_url(url)}")
    return 0


def _serve(settings: Settings, *, secret_files: dict[str, Path] | None = None,
           project: bool = True) -> int:

    asyncio.run(_migrate(settings.database_url))
    # Several processes (ingress, projection) share their Prometheus figures through files.
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="mirror-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _serve_with(settings, secret_files, project)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_with(settings: Settings, secret_files: dict[str, Path] | None,
                project: bool) -> int:
    from mirror.app import create_app
    from mirror.supervise import die_with_parent

    app = create_app(settings, project=project)
    shown_host = settings.host if settings.host not in {"0.0.0.0", "::"} else "127.0.0.1"
    print(f"webhook URL:     http://{shown_host}:{settings.port}/webhooks", flush=True)
    print(f"SQL connection:  {masked_url(settings.database_url)}", flush=True)
    for name, path in (secret_files or {}).items():
        print(f"{name}: kept in {path.resolve()}", flush=True)
    extra = settings.ingress_processes - 1
    children = []
    for _ in range(extra):
        pid = os.fork()
        if pid == 0:  # another ingress process on the same port; it dies with this one
            die_with_parent()
            _run_app(create_app(settings, project=False, complete=False), settings,
                     reuse_port=True)
            os._exit(0)
        children.append(pid)
    try:
        _run_app(app, settings, reuse_port=extra > 0)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


def _run_app(app: web.Application, settings: Settings, *, reuse_port: bool) -> None:
    from mirror.app import server_options

    loop = None
    if os.environ.get("MIRROR_UVLOOP", "1") == "1":
        with contextlib.suppress(ImportError):
            import uvloop

            loop = uvloop.new_event_loop()
    web.run_app(app, host=settings.host, port=settings.port, print=None,
                shutdown_timeout=10.0, handle_signals=True, access_log=None,
                reuse_port=reuse_port, loop=loop, **server_options(settings))


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env(database_url=database_url())
    return _serve(settings, project=not args.no_projector)


def cmd_up(args: argparse.Namespace) -> int:
    used = _local_env()
    settings = Settings.from_env(database_url=database_url())
    return _serve(settings, secret_files=used)


def cmd_project(args: argparse.Namespace) -> int:
    from mirror.db import create_pool
    from mirror.metrics import Metrics
    from mirror.projector import Projector

    url = database_url()
    # A fold allocates many small, acyclic JSON objects and keeps a cache of them: the cyclic
    # collector's full passes over that heap cost a fifth of the CPU at the default thresholds.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)

    async def run() -> None:
        if not args.no_migrate:
            # A worker outlives database outages: wait for the server instead of exiting.
            while True:
                try:
                    await _migrate(url)
                    break
                except DatabaseUnavailable as exc:
                    log.warning("waiting for the database", extra={"error": str(exc)})
                    await asyncio.sleep(1.0)
        pool = await create_pool(url)
        settings = Settings.from_env(os.environ, database_url=url, require_secrets=False)
        metrics = Metrics() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None
        workers = args.workers or settings.workers
        projector = Projector(pool, url, workers=workers, batch_size=settings.batch_size,
                              metrics=metrics)
        projector.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("projection workers running", extra={"workers": workers})
        await stop.wait()
        await projector.stop()
        await pool.close()

    asyncio.run(run())
    return 0


def read_database_url() -> str | None:
    """MIRROR_READ_DATABASE_URL: where `as-of`, `history` and the read API read."""
    return os.environ.get("MIRROR_READ_DATABASE_URL", "").strip() or None


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

    url = database_url()

    async def run() -> dict[str, Any]:
        async with connect(url) as conn:
            report = await gather(conn)
            report["truncated_deliveries"] = await completion.counts(conn)
            report["truncated_failures"] = await completion.failures(conn)
        report["read_replica"] = await _read_replica_status(read_database_url())
        return report

    report = asyncio.run(run())
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

    url = database_url()

    async def run() -> dict[str, int]:
        async with connect(url, timeout=30) as conn:
            return await rebuild(conn, args.resource)

    counts = asyncio.run(run())
    for name, count in counts.items():
        print(f"{name}: {count} objects rebuilt")
    return 0


def cmd_send_sample(args: argparse.Namespace) -> int:
    from mirror.sample import send_sample

    secret = os.environ.get("MIRROR_WEBHOOK_SECRET", "").strip()
    if not secret:
        path = DATA_DIR / "webhook_secret"
        if not path.exists():
            raise MirrorError("MIRROR_WEBHOOK_SECRET is not set and no local secret exists "
                              "yet (run make up first)")
        secret = path.read_text().strip()
    status, body, event = asyncio.run(send_sample(args.url, secret.split()[0].rstrip(","),
                                                  args.event_type, args.id))
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


def _reading() -> Any:
    """A read-only connection: the read replica if set and reachable, else the primary."""

    def warn(message: str) -> None:
        print(f"mirror: {message}", file=sys.stderr)

    return connect_for_reading(read_database_url(), database_url, warn=warn)


def cmd_as_of(args: argparse.Namespace) -> int:
    from mirror.history import object_as_of

    at = _parse_time_arg(args.at, "--at")
    known_at = _parse_time_arg(args.known_at, "--known-at")
    assert at is not None

    async def run() -> Any:
        async with _reading() as conn:
            return await object_as_of(conn, args.resource, args.id, at, args.connection_id,
                                      known_at)

    _connection, data = asyncio.run(run())
    if data is None:
        print(f"mirror: no state for {args.resource} {args.id} at {at.isoformat()}",
              file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from mirror.history import object_history

    async def run() -> list[dict[str, Any]]:
        async with _reading() as conn:
            return await object_history(conn, args.resource, args.id, args.connection_id)

    versions = asyncio.run(run())
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


def _api_settings(args: argparse.Namespace, *, need_access_token: bool = True) -> Any:
    from mirror.trackstar.client import ApiSettings

    return ApiSettings.from_env(os.environ, access_token=getattr(args, "access_token", None),
                                need_access_token=need_access_token)


def cmd_backfill(args: argparse.Namespace) -> int:
    from mirror.trackstar.backfill import backfill, render_results
    from mirror.trackstar.client import TrackstarClient

    api = _api_settings(args)
    since = _parse_time_arg(args.since, "--since")
    url = database_url()

    async def run() -> Any:
        await _migrate(url)
        async with connect(url, timeout=30) as conn, TrackstarClient(api) as client:
            return await backfill(conn, client, args.connection_id, resources=args.resource,
                                  since=since, page_size=args.page_size, progress=sys.stderr)

    results = asyncio.run(run())
    print(render_results(results))
    appended = sum(r.appended for r in results)
    print(f"{appended:,} new events appended; the projection workers (mirror serve or "
          "mirror project) fold them into the current-state tables")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_fetch_truncated(args: argparse.Namespace) -> int:
    from mirror.trackstar.client import TrackstarClient
    from mirror.trackstar.completion import fetch_truncated

    api = _api_settings(args, need_access_token=False)
    url = database_url()

    async def run() -> Any:
        async with connect(url, timeout=30) as conn, TrackstarClient(api) as client:
            return await fetch_truncated(conn, client, connection_id=args.connection_id,
                                         limit=args.limit)

    results = asyncio.run(run())
    for result in results:
        suffix = f": {result.message}" if result.message else ""
        print(f"{result.event_id}: {result.status}{suffix}")
    fetched = sum(1 for r in results if r.status == "fetched")
    print(f"{len(results)} truncated deliveries, {fetched} completed")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from mirror.trackstar.client import TrackstarClient
    from mirror.trackstar.reconcile import as_json, reconcile, render

    api = _api_settings(args)
    url = database_url()

    async def run() -> Any:
        await _migrate(url)
        async with connect(url, timeout=30) as conn, TrackstarClient(api) as client:
            return await reconcile(conn, client, args.connection_id, resources=args.resource,
                                   repair=args.repair, page_size=args.page_size)

    reports = asyncio.run(run())
    if args.json:
        print(json.dumps(as_json(reports), indent=2, default=str))
    else:
        print(render(reports, repair=args.repair))
    standing = any(r.status == "failed" or r.unrepaired for r in reports)
    return 1 if standing else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="local run: embedded PostgreSQL and generated secrets if unset"
                   ).set_defaults(func=cmd_up)
    serve = sub.add_parser("serve", help="run the ingress and projection workers")
    serve.add_argument("--no-projector", action="store_true",
                       help="ingress only (run `mirror project` elsewhere)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="apply schema.sql (idempotent)").set_defaults(func=cmd_migrate)
    project = sub.add_parser("project", help="run projection workers only")
    project.add_argument("--workers", type=int, default=None,
                         help="worker tasks in this process (default: MIRROR_WORKERS, 1)")
    project.add_argument("--no-migrate", action="store_true",
                         help="do not apply schema.sql first (mirror serve already did)")
    project.set_defaults(func=cmd_project)
    status = sub.add_parser("status", help="log size, lag, anomalies, unprojectable events")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    rebuild = sub.add_parser("rebuild", help="re-fold projections from the log")
    rebuild.add_argument("resource", nargs="?", help="one resource (default: all)")
    rebuild.set_defaults(func=cmd_rebuild)
    as_of = sub.add_parser("as-of", help="an object's state at a time (JSON)")
    as_of.add_argument("resource")
    as_of.add_argument("id")
    as_of.add_argument("--at", required=True, help="ISO 8601 time, or 'now'")
    as_of.add_argument("--known-at", default=None, help="count only events received by then")
    as_of.add_argument("--connection-id", default=None)
    as_of.set_defaults(func=cmd_as_of)
    hist = sub.add_parser("history", help="every version of an object")
    hist.add_argument("resource")
    hist.add_argument("id")
    hist.add_argument("--connection-id", default=None)
    hist.add_argument("--json", action="store_true")
    hist.set_defaults(func=cmd_history)
    sample = sub.add_parser("send-sample", help="sign and post a sample event")
    sample.add_argument("--url", default=None, help="webhook URL (default from MIRROR_PORT)")
    sample.add_argument("--event-type", default="order.created")
    sample.add_argument("--id", default=None, help="object id (default: random)")
    sample.set_defaults(func=cmd_send_sample)
    token_help = ("the connection's access token (default: MIRROR_TRACKSTAR_ACCESS_TOKEN, "
                  "which keeps it out of the process list); never stored or logged")
    fill = sub.add_parser("backfill", help="append every object the Trackstar API lists as "
                          "snapshot events (resumable)")
    fill.add_argument("--connection-id", required=True)
    fill.add_argument("--resource", action="append", default=None,
                      help="a resource to backfill (repeatable; default: all)")
    fill.add_argument("--since", default=None,
                      help="only objects updated at or after this ISO 8601 time")
    fill.add_argument("--access-token", default=None, help=token_help)
    fill.add_argument("--page-size", type=int, default=1000, help="objects per page (max 1000)")
    fill.set_defaults(func=cmd_backfill)
    fetch = sub.add_parser("fetch-truncated", help="complete truncated deliveries through "
                           "their data_url (needs MIRROR_TRACKSTAR_API_KEY)")
    fetch.add_argument("--connection-id", default=None, help="only this connection")
    fetch.add_argument("--limit", type=int, default=1000)
    fetch.set_defaults(func=cmd_fetch_truncated)
    rec = sub.add_parser("reconcile", help="compare current state with the Trackstar API; "
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
    logging_setup.setup(os.environ.get("MIRROR_LOG_LEVEL", "INFO"))
    args = build_parser().parse_args(argv)
    if getattr(args, "url", "unset") is None:
        host = os.environ.get("MIRROR_HOST", "127.0.0.1")
        args.url = f"http://{host}:{os.environ.get('MIRROR_PORT', '8080')}/webhooks"
    try:
        result: int = args.func(args)
        return result
    except MirrorError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("stopped", file=sys.stderr)
        return 130
