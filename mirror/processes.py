"""The processes `mirror serve` and `mirror project` run.

`mirror serve` is a small process tree: ``ingress_processes`` processes answer HTTP on one port
(SO_REUSEPORT; the first one is this process, the others are forked from it and die with it),
and one of them supervises the projection process (mirror/supervise.py), which runs
`mirror project`. They share their Prometheus figures through a directory
(PROMETHEUS_MULTIPROC_DIR), made here and removed when the service stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from aiohttp import web

from mirror.db import connect, create_pool, migrate
from mirror.errors import DatabaseUnavailable
from mirror.settings import Settings, masked_url, webhook_url

log = logging.getLogger("mirror.processes")


async def apply_schema(url: str) -> None:
    """`mirror migrate` on one connection."""
    async with connect(url) as conn:
        await migrate(conn)


def serve(settings: Settings, *, secret_files: dict[str, Path] | None = None,
          project: bool = True) -> int:
    """Migrate, then run the service until SIGINT/SIGTERM."""
    asyncio.run(apply_schema(settings.database_url))
    made = None
    if settings.metrics_dir is None:
        # prometheus_client reads the directory from the environment when it is imported, so
        # it is set before the app (and with it prometheus_client) is imported below.
        made = tempfile.mkdtemp(prefix="mirror-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
        settings = dataclasses.replace(settings, metrics_dir=made)
    try:
        return _serve_with(settings, secret_files, project)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def ingress_processes(settings: Settings, project: bool) -> int:
    """How many processes answer HTTP: MIRROR_INGRESS_PROCESSES, or one per core (at most 4)
    but one core left to the projection process when this service projects too. Measured on
    2 cores at a steady 1,000 events/s: two ingress processes beside the projection process
    starved it (visibility p99 1.4 s); one gave 0.27 s."""
    if settings.ingress_processes:
        return settings.ingress_processes
    cores = os.cpu_count() or 1
    if project and settings.projector == "process":
        cores -= 1
    return max(1, min(cores, 4))


def _serve_with(settings: Settings, secret_files: dict[str, Path] | None,
                project: bool) -> int:
    from mirror.app import create_app
    from mirror.supervise import die_with_parent

    app = create_app(settings, project=project)
    print(f"webhook URL:     {webhook_url(settings.host, settings.port)}", flush=True)
    print(f"SQL connection:  {masked_url(settings.database_url)}", flush=True)
    for name, path in (secret_files or {}).items():
        print(f"{name}: kept in {path.resolve()}", flush=True)
    extra = ingress_processes(settings, project) - 1
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
    if settings.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            loop = uvloop.new_event_loop()
    web.run_app(app, host=settings.host, port=settings.port, print=None,
                shutdown_timeout=10.0, handle_signals=True, access_log=None,
                reuse_port=reuse_port, loop=loop, **server_options(settings))


def project(settings: Settings, *, workers: int, migrate_first: bool = True) -> int:
    """Projection workers in this process until SIGINT/SIGTERM (each finishes its batch)."""
    from mirror.metrics import Metrics
    from mirror.projector import Projector

    # A fold allocates many small, acyclic JSON objects and keeps a cache of them: the cyclic
    # collector's full passes over that heap cost a fifth of the CPU at the default thresholds.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    url = settings.database_url

    async def run() -> None:
        if migrate_first:
            # A worker outlives database outages: wait for the server instead of exiting.
            while True:
                try:
                    await apply_schema(url)
                    break
                except DatabaseUnavailable as exc:
                    log.warning("waiting for the database", extra={"error": str(exc)})
                    await asyncio.sleep(1.0)
        pool = await create_pool(url)
        metrics = Metrics(multiprocess=True) if settings.metrics_dir else None
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
