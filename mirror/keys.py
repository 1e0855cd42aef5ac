"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from mirror.db import Reader
from mirror.eventlog import Appender
from mirror.metrics import Metrics
from mirror.settings import Settings
from mirror.verify import Verifier

if TYPE_CHECKING:
    from mirror.projector import Projector
    from mirror.supervise import ProjectorProcess
    from mirror.trackstar.completion import CompletionWorker

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
READER = web.AppKey("reader", Reader)
APPENDER = web.AppKey("appender", Appender)
VERIFIER = web.AppKey("verifier", Verifier)
METRICS = web.AppKey("metrics", Metrics)
PROJECTOR: web.AppKey[Projector | ProjectorProcess] = web.AppKey("projector")
COMPLETION: web.AppKey[CompletionWorker] = web.AppKey("completion")
