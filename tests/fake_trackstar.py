"""A fake Trackstar REST API for the tests, served on loopback by aiohttp.

It implements what the mirror relies on: the list endpoints with ``limit``/``page_token``
pagination (the token refuses a request whose filters differ from the first page's, so a client
that does not repeat every filter fails), the ``field[gte|gt|lte|lt]`` time filters, the two
credential headers, a per-access-token sliding-window rate limit answered with 429 +
``retry-after``, 501 for endpoints the integration "does not support", injected failures
(5xx answers, dropped connections) and ``data_url`` endpoints for truncated events. Every
request is recorded with its arrival time, so tests measure waits instead of sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from projections.base import parse_time

LIST_PATHS = ("/wms/orders", "/wms/inventory", "/wms/products", "/wms/inbound-shipments",
              "/wms/returns", "/wms/shipping-methods", "/wms/billing", "/wms/warehouses",
              "/wms/warehouse-customers")
_LOCATIONS = re.compile(r"^/wms/warehouses/([^/]+)/locations$")
_FILTER = re.compile(r"^(updated_date|trackstar_updated_date|created_date)\[(gte|gt|lte|lt)\]$")
DROP = 0  # an injected "status" that drops the connection instead of answering


@dataclass
class Served:
    """One request as the fake saw it."""

    at: float                 # time.monotonic() on arrival
    path: str
    query: dict[str, str]
    status: int
    api_key_sent: bool
    token: str | None


class FakeTrackstar:
    """The fake API. ``objects[connection_id][path][id]`` holds what the lists return."""

    def __init__(self, *, api_key: str, tokens: dict[str, str], rate_limit: int = 10_000,
                 window: float = 1.0, retry_after: str = "1") -> None:
        self.api_key = api_key
        self.tokens = dict(tokens)                  # access token -> connection id
        self.rate_limit = rate_limit
        self.window = window
        self.retry_after = retry_after
        self.objects: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        self.unsupported: set[str] = set()
        self.error_every = 0                        # every n-th list request answers 503
        self.inject: list[int] = []                 # statuses for the next list requests
        self.broken_from: int | None = None         # pages from this offset on answer 503
        self.short_by = 0                           # pages end this many objects early
        self.data_inject: list[int] = []            # statuses for the next data_url requests
        self.data_delay = 0.0                       # seconds each data_url answer takes
        self.data_rate_limit = 10_000               # data_url requests per window per API key
        self.events: dict[str, Any] = {}            # data_url answers by event id
        self.signed: dict[str, Any] = {}            # answers of the links data_url returns
        self.requests: list[Served] = []
        self.on_request: Callable[[Served], None] | None = None
        self._recent: dict[str, deque[float]] = {}
        self._lists = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- data -----------------------------------------------------------------------------
    def put(self, connection_id: str, path: str, obj: dict[str, Any]) -> None:
        """Add or replace an object of a list."""
        self.objects.setdefault(connection_id, {}).setdefault(path, {})[str(obj["id"])] = obj

    def remove(self, connection_id: str, path: str, object_id: str) -> None:
        """Drop an object from a list."""
        del self.objects[connection_id][path][object_id]

    def listed(self, connection_id: str, path: str) -> dict[str, dict[str, Any]]:
        """What a list holds (unfiltered)."""
        return dict(self.objects.get(connection_id, {}).get(path, {}))

    def data_url(self, event_id: str) -> str:
        """The data_url of a truncated event served by this fake."""
        return f"{self.url}/webhooks/events/{event_id}/data"

    def served(self, prefix: str = "/wms/") -> list[Served]:
        """Recorded requests whose path starts with ``prefix``."""
        return [r for r in self.requests if r.path.startswith(prefix)]

    # -- server ---------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen on a free loopback port; return the base URL."""
        app = web.Application()
        app.router.add_get("/wms/{tail:.+}", self._list)
        app.router.add_get("/webhooks/events/{event_id}/data", self._data)
        app.router.add_get("/signed/{event_id}", self._signed)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _record(self, request: web.Request, status: int) -> Served:
        served = Served(time.monotonic(), request.path, dict(request.query), status,
                        "x-trackstar-api-key" in request.headers,
                        request.headers.get("x-trackstar-access-token"))
        self.requests.append(served)
        if self.on_request is not None:
            self.on_request(served)
        return served

    @staticmethod
    def _error(status: int, message: str, origin: str = "trackstar",
               headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": message, "origin": origin}, status=status,
                                 headers=headers)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        served = self._record(request, 200)
        answer = await self._answer_list(request)
        served.status = answer.status
        return answer

    async def _answer_list(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-trackstar-api-key") != self.api_key:
            return self._error(401, "Invalid API key")
        token = request.headers.get("x-trackstar-access-token", "")
        connection_id = self.tokens.get(token)
        if connection_id is None:
            return self._error(401, "Invalid access token")
        now = time.monotonic()
        recent = self._recent.setdefault(token, deque())
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.rate_limit:
            return self._error(429, "Too many requests",
                               headers={"retry-after": self.retry_after})
        recent.append(now)
        self._lists += 1
        if self.inject:
            status = self.inject.pop(0)
            if status == DROP:
                assert request.transport is not None
                request.transport.close()
                await asyncio.sleep(0)
                return web.Response(status=500)
            return self._error(status, "injected failure", "fake")
        if self.error_every and self._lists % self.error_every == 0:
            return self._error(503, "Service temporarily unavailable")
        path = request.path
        if path in self.unsupported:
            return self._error(501, "This endpoint is not supported by the integration",
                               "integration")
        match = _LOCATIONS.match(path)
        if path not in LIST_PATHS and not match:
            return self._error(404, "Not found")
        if match and match.group(1) not in self.listed(connection_id, "/wms/warehouses"):
            return self._error(404, "No such warehouse")
        query = dict(request.query)
        try:
            limit = int(query.pop("limit", "1000"))
        except ValueError:
            return self._error(400, "limit must be an integer")
        if not 1 <= limit <= 1000:
            return self._error(400, "limit must be between 1 and 1000")
        page_token = query.pop("page_token", None)
        filters: list[tuple[str, str, datetime]] = []
        for key, value in query.items():
            found = _FILTER.match(key)
            when = parse_time(value)
            if not found or when is None:
                return self._error(400, f"unsupported filter {key}={value}")
            filters.append((found.group(1), found.group(2), when))
        signature = json.dumps(sorted(query.items()))
        offset = 0
        if page_token is not None:
            try:
                state = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                offset = int(state["offset"])
            except (ValueError, KeyError, TypeError):
                return self._error(400, "invalid page_token")
            if state.get("filters") != signature:
                return self._error(400, "page_token does not match the filters: repeat every "
                                        "filter on every page")
        if self.broken_from is not None and offset >= self.broken_from:
            return self._error(503, "Service temporarily unavailable")
        items = [obj for _, obj in sorted(self.listed(connection_id, path).items())
                 if _matches(obj, filters)]
        total = len(items)
        if self.short_by:
            items = items[:max(0, total - self.short_by)]
        page = items[offset:offset + limit]
        next_token = None
        if offset + limit < len(items):
            next_token = base64.urlsafe_b64encode(json.dumps(
                {"offset": offset + limit, "filters": signature}).encode()).decode()
        return web.json_response({"data": page, "next_token": next_token,
                                  "total_count": total})

    def _limited(self, key: str, limit: int) -> bool:
        """Sliding-window rate limit: True when this request is over ``limit``."""
        now = time.monotonic()
        recent = self._recent.setdefault(key, deque())
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= limit:
            return True
        recent.append(now)
        return False

    async def _data(self, request: web.Request) -> web.Response:
        served = self._record(request, 200)
        if request.headers.get("x-trackstar-api-key") != self.api_key:
            served.status = 401
            return self._error(401, "Invalid API key")
        if self._limited("data:" + self.api_key, self.data_rate_limit):
            served.status = 429
            return self._error(429, "Too many requests",
                               headers={"retry-after": self.retry_after})
        if self.data_inject:
            served.status = self.data_inject.pop(0)
            return self._error(served.status, "injected failure", "fake")
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        answer = self.events.get(request.match_info["event_id"])
        if answer is None:
            served.status = 404
            return self._error(404, "No such event")
        return web.json_response(answer)

    async def _signed(self, request: web.Request) -> web.Response:
        served = self._record(request, 200)
        answer = self.signed.get(request.match_info["event_id"])
        if answer is None or request.query.get("sig") != "ok":
            served.status = 403
            return self._error(403, "Bad signature")
        return web.json_response(answer)


def _matches(obj: dict[str, Any], filters: list[tuple[str, str, datetime]]) -> bool:
    for field_name, op, when in filters:
        value = parse_time(obj.get(field_name))
        if value is None:
            return False
        if op == "gte" and not value >= when:
            return False
        if op == "gt" and not value > when:
            return False
        if op == "lte" and not value <= when:
            return False
        if op == "lt" and not value < when:
            return False
    return True
