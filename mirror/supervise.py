"""Projection workers in a child process of `mirror serve`.

Folding is CPU work in Python; in the ingress's own process every batch would hold the event
loop and every webhook answer would wait behind it. The child runs `mirror project` with the
same environment, is restarted if it dies, and is stopped with SIGTERM (it finishes or rolls
back its batch) when the service shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("mirror.supervise")


def die_with_parent() -> None:
    """In a child process: ask Linux to SIGTERM it when its parent dies, even by SIGKILL, so
    no orphaned worker outlives the service."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
# Under CPU contention webhook answers come first (Svix gives up after 15 s; projection lag
# only delays visibility and is caught up as soon as load eases).
PROJECTION_NICENESS = 5


def _projection_child() -> None:
    die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(PROJECTION_NICENESS)


class ProjectorProcess:
    """`mirror project` as a supervised child: ``start``, ``stop``, ``running``."""

    def __init__(self, database_url: str, workers: int, batch_size: int) -> None:
        self._cmd = [sys.executable, "-m", "mirror", "project", "--workers", str(workers),
                     "--no-migrate"]
        self._env = {**os.environ, "DATABASE_URL": database_url,
                     "MIRROR_BATCH_SIZE": str(batch_size)}
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.create_task(self._keep_alive(), name="projector-process")

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._cmd, env=self._env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            preexec_fn=_projection_child)

    async def _keep_alive(self) -> None:
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.error("projection process exited, restarting", extra={"code": code})
            await asyncio.sleep(1.0)
            if not self._stopping:
                await self._spawn()

    async def stop(self) -> None:
        """SIGTERM the child and wait for it (it commits or rolls back its batch)."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
