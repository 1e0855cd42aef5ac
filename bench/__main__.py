"""`make bench`: every figure beside its baseline, measured in the same run.

Environment knobs: DATABASE_URL (else an embedded PostgreSQL in a temporary directory),
BENCH_EVENTS (ingest requests per server, default 20000), BENCH_PROJECTOR_EVENTS (log size
for the cold projector run, default 1000000), BENCH_CONCURRENCY (default 64).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench import load, scaling
from bench.workload import generate

SECRET = "whsec_" + base64.b64encode(b"trackstar-mirror-bench-secret!!").decode()
TOKEN = "bench-token-" + "x" * 20
ROOT = Path(__file__).resolve().parent.parent


def _with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fresh_db(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_db(admin_url, name)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _start(kind: str, dsn: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": dsn, "MIRROR_WEBHOOK_SECRET": SECRET,
           "MIRROR_API_TOKEN": TOKEN, "MIRROR_PORT": str(port), "MIRROR_LOG_LEVEL": "WARNING"}
    module = {"naive": ["bench.naive", str(port), dsn, SECRET],
              "ceiling": ["bench.ceiling", str(port), dsn, SECRET],
              "mirror": ["mirror", "serve"]}[kind]
    proc = subprocess.Popen([sys.executable, "-m", *module], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class LagWatcher(threading.Thread):
    """Polls /readyz during a run and keeps the largest projection lag it saw."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.max_events = 0
        self.max_seconds = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz",
                                            timeout=2) as r:
                    lag = json.loads(r.read()).get("lag", {})
                    self.max_events = max(self.max_events, int(lag.get("events", 0)))
                    self.max_seconds = max(self.max_seconds, float(lag.get("seconds", 0)))
            except Exception:
                pass
            self.stop.wait(0.5)


def ingest(admin_url: str, events: int, concurrency: int) -> dict[str, Any]:
    """Ingest throughput and latency: naive baseline, verify-only ceiling, the mirror."""
    deliveries = generate(events, seed=11)
    warm = generate(300, seed=99)
    out: dict[str, Any] = {}
    for kind in ("naive", "ceiling", "mirror"):
        dsn = asyncio.run(_fresh_db(admin_url, f"bench_{kind}"))
        if kind == "mirror":
            subprocess.run([sys.executable, "-m", "mirror", "migrate"], cwd=ROOT, check=True,
                           env={**os.environ, "DATABASE_URL": dsn},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = _free_port()
        proc = _start(kind, dsn, port)
        try:
            load.run(port, load.sign_all(warm, SECRET, port), concurrency=8)
            visibility = None
            watcher = None
            if kind == "mirror":
                visibility = (dsn, _sample(deliveries, 10))
                watcher = LagWatcher(port)
                watcher.start()
            result = load.run(port, load.sign_all(deliveries, SECRET, port), concurrency,
                              visibility)
            if watcher is not None:
                watcher.stop.set()
                watcher.join()
            stored = asyncio.run(_count(dsn, kind))
            entry: dict[str, Any] = {
                "requests": len(deliveries),
                "events_per_s": round(len(deliveries) / result.wall, 1),
                "stored": stored,
                "p50_ms": round(load.percentile(result.latencies, 0.5) * 1000, 2),
                "p99_ms": round(load.percentile(result.latencies, 0.99) * 1000, 2),
                "statuses": dict(result.statuses),
                "driver_cpu_s": round(result.driver_cpu, 2),
                "wall_s": round(result.wall, 2),
                "server_peak_rss_mb": round(_peak_rss_mb(proc.pid), 1),
            }
            if kind == "mirror" and watcher is not None:
                entry.update(
                    visibility_p50_ms=round(load.percentile(result.visibility, 0.5) * 1000, 1),
                    visibility_p99_ms=round(load.percentile(result.visibility, 0.99) * 1000, 1),
                    visibility_samples=len(result.visibility),
                    visibility_missing=result.visibility_missing,
                    max_lag_events=watcher.max_events,
                    max_lag_seconds=watcher.max_seconds)
            out[kind] = entry
        finally:
            _stop(proc)
        print(f"  ingest {kind}: {out[kind]['events_per_s']} events/s", file=sys.stderr)
    return out


def _sample(deliveries: list[Any], every: int) -> dict[int, str]:
    """Every ``every``-th first delivery of a message: whose visibility is timed."""
    seen: set[str] = set()
    sample: dict[int, str] = {}
    for index, d in enumerate(deliveries):
        if d.msg_id not in seen and index % every == 0:
            sample[index] = d.msg_id
        seen.add(d.msg_id)
    return sample


def visibility(admin_url: str, rate: int = 1000, seconds: int = 20) -> dict[str, Any]:
    """2xx → projected at a steady, paced ``rate`` (not a saturating load): p50 / p99."""
    deliveries = generate(rate * seconds, seed=23)
    dsn = asyncio.run(_fresh_db(admin_url, "bench_visibility"))
    subprocess.run([sys.executable, "-m", "mirror", "migrate"], cwd=ROOT, check=True,
                   env={**os.environ, "DATABASE_URL": dsn},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = _free_port()
    proc = _start("mirror", dsn, port)
    try:
        load.run(port, load.sign_all(generate(300, seed=98), SECRET, port), concurrency=8)
        result = load.run(port, load.sign_all(deliveries, SECRET, port), 32,
                          (dsn, _sample(deliveries, 5)),
                          pace=rate)
    finally:
        _stop(proc)
    out = {"rate": rate, "seconds": seconds, "sent_per_s": round(len(deliveries) / result.wall),
           "p50_ms": round(load.percentile(result.visibility, 0.5) * 1000, 1),
           "p99_ms": round(load.percentile(result.visibility, 0.99) * 1000, 1),
           "samples": len(result.visibility), "missing": result.visibility_missing,
           "statuses": dict(result.statuses)}
    print(f"  visibility at {rate}/s: p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms",
          file=sys.stderr)
    return out


async def _count(dsn: str, kind: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        table = "naive.events" if kind == "naive" else "mirror.events"
        if kind == "ceiling":
            return 0
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


def main() -> int:
    events = int(os.environ.get("BENCH_EVENTS", "20000"))
    projector_events = int(os.environ.get("BENCH_PROJECTOR_EVENTS", "1000000"))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "64"))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        admin = os.environ.get("DATABASE_URL", "").strip()
        server = None
        if not admin:
            from mirror import embedded

            server, url = embedded.start(Path(tmp) / "pg")
            admin = _with_db(url, "postgres")
        from bench import deep

        results: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{platform.python_implementation()} {platform.python_version()}",
            "concurrency": concurrency,
            "ingest": ingest(admin, events, concurrency),
            "visibility": visibility(admin),
        }
        results.update(deep.run(admin, projector_events))
        results["scaling"] = scaling.run(admin)
        if server is not None:
            server.cleanup()
    results["total_s"] = round(time.time() - started, 1)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def render(r: dict[str, Any]) -> str:
    """The results as a table with the targets beside each figure."""
    i = r["ingest"]
    naive, ceiling, mirror = i["naive"], i["ceiling"], i["mirror"]
    p = r["projector"]
    small, shuffled, large = p["small"], p["small_shuffled"], p["large"]
    rb = r["rebuild"]
    v = r["visibility"]
    a = r["as_of"]
    lines = [
        f"Trackstar Mirror benchmark — {r['date']} — {r['machine']}",
        "",
        "| figure | mirror | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| ingest, durable events/s (c={r['concurrency']}) | {mirror['events_per_s']} "
        f"| naive {naive['events_per_s']} | {mirror['events_per_s'] / naive['events_per_s']:.2f}x "
        "| ≥ 2.5x |",
        f"| ingest vs verify-only ceiling | {mirror['events_per_s']} | ceiling "
        f"{ceiling['events_per_s']} | {mirror['events_per_s'] / ceiling['events_per_s']:.0%} "
        "| ≥ 75% |",
        f"| ingest latency p50 / p99 (ms) | {mirror['p50_ms']} / {mirror['p99_ms']} | naive "
        f"{naive['p50_ms']} / {naive['p99_ms']} | | |",
        f"| 2xx → projected, saturating ingest, p50 / p99 (ms) | {mirror['visibility_p50_ms']} / "
        f"{mirror['visibility_p99_ms']} | | | |",
        f"| max projection lag during saturating ingest | {mirror['max_lag_events']} events, "
        f"{mirror['max_lag_seconds']} s | | | bounded |",
        f"| 2xx → projected at a steady {v['rate']}/s, p50 / p99 (ms) | {v['p50_ms']} / "
        f"{v['p99_ms']} | | | p99 ≤ 250 |",
        f"| cold projection, {small['events']:,} events in order, {small['processes']} processes "
        f"| {small['events_per_s']:,.0f} events/s | | | ≥ 10,000 |",
        f"| cold projection, {large['events']:,} events in order | "
        f"{large['events_per_s']:,.0f} events/s | {small['events']:,}: "
        f"{small['events_per_s']:,.0f} | {large['events_per_s'] / small['events_per_s']:.2f}x "
        "| ≥ 10,000 and ≥ 0.75x |",
        f"| cold projection, {shuffled['events']:,} events shuffled within 200 | "
        f"{shuffled['events_per_s']:,.0f} events/s | in order {small['events_per_s']:,.0f} | "
        f"{shuffled['events_per_s'] / small['events_per_s']:.2f}x | ≥ 0.60x |",
        f"| rebuild of every resource ({rb['events']:,} events, one transaction) | "
        f"{rb['events_per_s']:,.0f} events/s | | | ≥ 15,000 |",
    ]
    for depth in ("1", "100", "10000"):
        for suffix, label in (("", ""), ("_known_at", ", known_at")):
            q = a[depth + suffix]
            base = a["1" + suffix]["p99_ms"]
            lines.append(f"| object_as_of p50 / p99, {depth} versions{label} (ms) | "
                         f"{q['p50_ms']} / {q['p99_ms']} | 1 version: {base} | "
                         f"{q['p99_ms'] / max(base, 1e-9):.2f}x | p99 < 2, flat |")
    lines += scaling.render(r["scaling"]) if "scaling" in r else []
    t = r["table_as_of"]
    lines += [
        f"| table_as_of over {t['objects']:,} {t['resource']} objects, count(*) (ms) | "
        f"{t['ms']} | | | ≤ 300 |",
        f"| table_as_of, every row's data fetched by the client (ms) | {t['fetch_ms']} "
        f"| {t['rows_at_t']:,} rows | | |",
        f"| service peak RSS under load (MB) | {mirror['server_peak_rss_mb']} | naive "
        f"{naive['server_peak_rss_mb']} | | < 300 |",
        "",
        f"load driver: one process, raw keep-alive HTTP/1.1, {i['mirror']['requests']} "
        f"pre-signed requests per server; its CPU: naive {naive['driver_cpu_s']} s / "
        f"{naive['wall_s']} s, ceiling {ceiling['driver_cpu_s']} s / {ceiling['wall_s']} s, "
        f"mirror {mirror['driver_cpu_s']} s / {mirror['wall_s']} s",
        f"total bench time: {r['total_s']} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
