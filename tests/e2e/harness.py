"""Drive the real service as a subprocess and talk to it the way hostile clients do.

- ``Service``: ``python -m mirror serve`` with its stdout and stderr kept in files (a pipe
  nobody reads would fill up and block the service), started, restarted, SIGTERMed, SIGKILLed.
- ``OwnedPostgres``: an embedded PostgreSQL that a test owns and may stop and start.
- ``raw_exchange``: bytes over a plain socket, for requests no HTTP client library would send.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import API_TOKEN, SECRET


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send ``data`` on a fresh connection and read until the server closes it (or
    ``timeout`` passes); return the status of the first answer (None: no answer) and every
    byte received."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            # No half-close: aiohttp drops a connection whose client has shut down writing.
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and close before it has read everything
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return status_of(bytes(received)), bytes(received)


def status_of(answer: bytes) -> int | None:
    """The status code of the first HTTP answer in ``answer``, if there is one."""
    line = answer.split(b"\r\n", 1)[0].split()
    if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
        return int(line[1])
    return None


def request_bytes(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                  *, content_length: bool = True) -> bytes:
    """A raw HTTP/1.1 request; header names and values are sent byte for byte."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    head += [name + b": " + value for name, value in headers]
    if content_length:
        head.append(b"Content-Length: " + str(len(body)).encode())
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Service:
    """``python -m mirror serve`` on its own port, against ``db_url``."""

    def __init__(self, db_url: str, workdir: Path, env: Mapping[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
                    "DATABASE_URL": db_url, "MIRROR_WEBHOOK_SECRET": SECRET,
                    "MIRROR_API_TOKEN": API_TOKEN, "MIRROR_PORT": str(self.port),
                    **(env or {})}
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / f"service-{self.port}.stderr"
        self.stdout_path = workdir / f"service-{self.port}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, timeout: float = 60.0) -> Service:
        """Start the process (again) and wait until /healthz answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", *self.args],
                                         env=self.env, stdout=out, stderr=err)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                status, _ = raw_exchange(self.port, request_bytes("GET", "/healthz", [], b""),
                                         timeout=2.0)
            except OSError:
                status = None
            if status == 200:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"service did not answer /healthz within {timeout} s:\n{self.logs()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful anything."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code (killed if it does not stop in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def logs(self) -> str:
        """Everything the service wrote on stderr, over all its runs."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def output(self) -> str:
        """Everything the service wrote on stdout, over all its runs."""
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""


class OwnedPostgres:
    """An embedded PostgreSQL (pgserver) in ``pgdata`` that the test may stop and start."""

    def __init__(self, pgdata: Path) -> None:
        from mirror import embedded

        self.server, self.url = embedded.start(pgdata)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; ``immediate`` is a crash (no checkpoint, recovery on start)."""
        from pgserver._commands import pg_ctl  # type: ignore[import-not-found]

        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.server.pgdata,
               user=self.server.system_user, timeout=60)

    def start(self) -> None:
        """Start it again on the same socket, so the same URL reaches it."""
        self.server.ensure_postgres_running()

    def close(self) -> None:
        """Stop it for good."""
        self.server.cleanup()


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Rows of one query on a fresh connection."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def wait_projected(url: str, timeout: float = 60.0) -> None:
    """Until no stored, projectable event is left unprojected (bounded by ``timeout``)."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            pending = await conn.fetchval(
                "SELECT count(*) FROM mirror.checkpoints c JOIN mirror.events e "
                "ON e.part = c.part AND (e.txid, e.position) > (c.last_txid, c.last_position)")
            if pending == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{pending} events still unprojected after {timeout} s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
