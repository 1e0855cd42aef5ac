"""The Trackstar REST API client used by backfill, reconcile and truncated-event completion.

It knows the list endpoints, pages through them (``next_token`` passed back as ``page_token``,
every filter repeated on every page), keeps under the per-token rate limit, honours ``429`` +
``retry-after`` and retries transient failures (5xx, dropped connections, timeouts) with
exponential backoff. Credentials travel only in request headers: they are never logged, never
part of an error message, and never sent to any host but the configured API.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from mirror.errors import ConfigError, MirrorError
from mirror.parsing import loads
from mirror.settings import DEFAULT_TRACKSTAR_BASE_URL, Settings, trackstar_base_url

log = logging.getLogger("mirror.trackstar.client")

DEFAULT_BASE_URL = DEFAULT_TRACKSTAR_BASE_URL
DEFAULT_RATE = 10.0     # GET requests per second per access token (Trackstar's limit)
MAX_PAGE_SIZE = 1000    # the largest `limit` the list endpoints accept


class TrackstarError(MirrorError):
    """The API answered with an error (after any retries); ``status`` 0 means no answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class Unsupported(TrackstarError):
    """501: the connection's integration does not support this endpoint."""


class AuthFailed(TrackstarError):
    """401/403: the API key or the access token was refused."""


class NotApiHost(TrackstarError):
    """A URL to be fetched with the API key is not on the configured API's origin."""


@dataclass(frozen=True)
class ApiSettings:
    """Where the API is and the credentials to call it with (never shown by ``repr``)."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)
    access_token: str = field(default="", repr=False)
    rate: float = DEFAULT_RATE

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, access_token: str | None = None,
                 need_access_token: bool = True) -> ApiSettings:
        """Build from ``MIRROR_TRACKSTAR_*``; errors name the variable, never its value."""
        base = trackstar_base_url(env)
        key = (env.get("MIRROR_TRACKSTAR_API_KEY") or "").strip()
        if not key:
            raise ConfigError("MIRROR_TRACKSTAR_API_KEY is not set: the organisation API key "
                              "is needed to call the Trackstar API")
        token = (access_token or env.get("MIRROR_TRACKSTAR_ACCESS_TOKEN") or "").strip()
        if need_access_token and not token:
            raise ConfigError("no access token: pass --access-token or set "
                              "MIRROR_TRACKSTAR_ACCESS_TOKEN to the connection's token")
        return cls(base, key, token)

    @classmethod
    def for_service(cls, settings: Settings) -> ApiSettings | None:
        """The service's API settings (no access token: completion needs only the key);
        None when no key is configured."""
        if not settings.trackstar_api_key:
            return None
        return cls(settings.trackstar_base_url, settings.trackstar_api_key)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying. Delays double from ``base_delay`` up to ``max_delay``."""

    attempts: int = 6              # tries per request for 5xx / connection failures
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_rate_limited: int = 50     # 429 answers tolerated per request
    max_retry_after: float = 300.0

    def delay(self, failures: int) -> float:
        """Backoff before retry number ``failures`` (1-based), with jitter."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** max(0, failures - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint."""

    data: list[dict[str, Any]]
    next_token: str | None
    total_count: int | None


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """Spaces requests ``(1 + margin) / rate`` seconds apart; a 429 pauses every request until
    its ``retry-after`` has passed (the limit is per access token, so one pause covers all).

    Why the margin: the server counts arrivals, not sends. With requests exactly ``1/rate``
    apart, network jitter alone regularly puts ``rate + 1`` arrivals inside one second of a
    sliding window and earns a 429 (and its wait); 10% under the limit never does.
    """

    def __init__(self, rate: float, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, margin: float = 0.1) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = (1.0 + margin) / rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for this request's turn."""
        async with self._lock:
            # Look again after sleeping: a 429 answered meanwhile may have moved the turn.
            while (wait := self._next - self._clock()) > 0:
                await self._sleep(wait)
            self._next = max(self._clock(), self._next) + self._interval

    def pause(self, seconds: float) -> None:
        """No request before ``seconds`` from now."""
        self._next = max(self._next, self._clock() + seconds)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """The wait a ``retry-after`` header asks for (seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _error_text(raw: bytes) -> str:
    """The ``error`` of a Trackstar error body, else a short excerpt of the body."""
    try:
        doc = loads(raw)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        origin = doc.get("origin")
        suffix = f" (origin: {origin})" if isinstance(origin, str) else ""
        return str(doc["error"])[:300] + suffix
    return raw[:200].decode("utf-8", errors="replace") or "no body"


_TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class TrackstarClient:
    """An aiohttp client of the Trackstar API for one access token.

    Use as ``async with TrackstarClient(settings) as client``. ``clock`` and ``sleep`` are
    injectable so that waits can be observed; tests use the fake API's own request log.
    """

    def __init__(self, settings: ApiSettings, *, retry: RetryPolicy | None = None,
                 timeout: float = 60.0, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.settings = settings
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._limiter = RateLimiter(settings.rate, clock, sleep)
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0        # HTTP requests sent, retries included
        self.retries = 0         # of which retries after a 5xx or a dropped connection
        self.rate_limited = 0    # 429 answers received

    async def __aenter__(self) -> TrackstarClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session. Safe to call twice."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, *, access_token: bool) -> dict[str, str]:
        headers = {"x-trackstar-api-key": self.settings.api_key, "accept": "application/json"}
        if access_token:
            headers["x-trackstar-access-token"] = self.settings.access_token
        return headers

    async def list_page(self, path: str, filters: Mapping[str, str], page_token: str | None,
                        limit: int = MAX_PAGE_SIZE) -> Page:
        """One page of a list endpoint: the filters, and ``page_token`` after the first page."""
        params = dict(filters)
        params["limit"] = str(max(1, min(limit, MAX_PAGE_SIZE)))
        if page_token is not None:
            params["page_token"] = page_token
        doc = await self._get_json(self.settings.base_url + path, params,
                                   self._headers(access_token=True))
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise TrackstarError(200, f"{path}: the answer has no data list")
        data = [item for item in doc["data"] if isinstance(item, dict)]
        if len(data) != len(doc["data"]):
            raise TrackstarError(200, f"{path}: the data list holds something not an object")
        token = doc.get("next_token")
        total = doc.get("total_count")
        return Page(data, token if isinstance(token, str) and token else None,
                    total if isinstance(total, int) and not isinstance(total, bool) else None)

    async def fetch_event(self, data_url: str) -> Any:
        """The full event behind a truncated delivery's ``data_url``.

        The API key is sent only when ``data_url`` is on the configured API's origin, and
        redirects are not followed with it. If the answer is a link rather than the event
        (``{"url": …}``, or a redirect), the link is fetched without any credential.
        """
        if origin_of(data_url) != origin_of(self.settings.base_url):
            base = urlsplit(self.settings.base_url)
            raise NotApiHost(0, "data_url is not on the Trackstar API host "
                                f"({base.scheme}://{base.netloc}); not sending the API key")
        doc = await self._get_json(data_url, {}, self._headers(access_token=False),
                                   follow_link=True)
        link = _link_of(doc)
        if link is not None:
            doc = await self._get_json(link, {}, {"accept": "application/json"})
        return doc

    async def _get_json(self, url: str, params: Mapping[str, str], headers: Mapping[str, str],
                        *, follow_link: bool = False) -> Any:
        """GET with rate limiting and retries. A redirect is answered as ``{"url": target}``
        when ``follow_link`` (the caller fetches it without credentials), else an error."""
        if self._session is None:
            raise RuntimeError("TrackstarClient used outside `async with`")
        where = urlsplit(url).path
        failures = 0
        limited = 0
        while True:
            await self._limiter.acquire()
            self.requests += 1
            try:
                async with self._session.get(url, params=params, headers=headers,
                                             allow_redirects=False) as response:
                    status = response.status
                    raw = await response.read()
                    retry_after = response.headers.get("retry-after")
                    location = response.headers.get("location")
                    answered_url = response.url
            except _TRANSIENT as exc:
                failures += 1
                if failures >= self._retry.attempts:
                    raise TrackstarError(0, f"{where}: no answer after {failures} attempts "
                                            f"({type(exc).__name__})") from None
                self.retries += 1
                delay = self._retry.delay(failures)
                log.warning("trackstar request failed, retrying",
                            extra={"path": where, "error": type(exc).__name__,
                                   "attempt": failures, "delay": round(delay, 3)})
                await self._sleep(delay)
                continue
            if 200 <= status < 300:
                try:
                    return loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise TrackstarError(status, f"{where}: the answer is not JSON") from None
            if 300 <= status < 400 and follow_link and location:
                return {"url": str(answered_url.join(URL(location)))}
            if status == 429:
                limited += 1
                self.rate_limited += 1
                if limited > self._retry.max_rate_limited:
                    raise TrackstarError(status, f"{where}: still rate limited after "
                                                 f"{limited} waits")
                wait = retry_after_seconds(retry_after)
                wait = self._retry.delay(limited) if wait is None else \
                    min(wait, self._retry.max_retry_after)
                log.info("trackstar rate limit, waiting",
                         extra={"path": where, "retry_after": round(wait, 3)})
                self._limiter.pause(wait)
                continue
            if status >= 500 and status != 501:
                failures += 1
                if failures >= self._retry.attempts:
                    raise TrackstarError(status, f"{where}: {_error_text(raw)} "
                                                 f"(after {failures} attempts)")
                self.retries += 1
                delay = self._retry.delay(failures)
                log.warning("trackstar server error, retrying",
                            extra={"path": where, "status": status, "attempt": failures,
                                   "delay": round(delay, 3)})
                await self._sleep(delay)
                continue
            message = f"{where}: {_error_text(raw)}"
            if status == 501:
                raise Unsupported(status, message)
            if status in {401, 403}:
                raise AuthFailed(status, message)
            raise TrackstarError(status, message)


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, lower case and with the default port filled
    in; None for anything else (credentials in the URL included: never a match)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"} or not parts.hostname or "@" in parts.netloc:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _link_of(doc: Any) -> str | None:
    """The link a data_url answered with instead of the event, if it did."""
    if not isinstance(doc, dict) or "event_type" in doc or "data" in doc or "id" in doc:
        return None
    for key in ("url", "data_url", "link"):
        value = doc.get(key)
        if isinstance(value, str) and urlsplit(value).scheme in {"http", "https"}:
            return value
    return None
