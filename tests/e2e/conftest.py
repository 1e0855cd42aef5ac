"""Fixtures of the end-to-end tests: services started as subprocesses and stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Service


@pytest.fixture
def start_service(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """``start_service(env=..., args=..., db=...)`` starts a service; all are stopped after
    the test (SIGTERM, then SIGKILL if one does not stop)."""
    started: list[Service] = []

    def start(env: dict[str, str] | None = None, args: tuple[str, ...] = (),
              db: str | None = None, **kwargs: Any) -> Service:
        service = Service(db or db_url, tmp_path / "service", env, args)
        started.append(service)
        return service.start(**kwargs)

    yield start
    for service in started:
        if service.running:
            service.stop()
