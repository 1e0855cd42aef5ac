"""What every HTTP request passes through: the ``Expect`` header, the bearer token, and the
translation of mirror errors into statuses; and the one shape of a JSON answer.

Handlers raise the errors of mirror/errors.py and return their data; ``errors`` answers for
them. The webhook handler (mirror/ingress.py) is the exception: it answers each refusal itself,
because every outcome there is counted in /metrics.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion11

from mirror import parsing
from mirror.errors import (
    AmbiguousObject,
    BadRequest,
    DatabaseUnavailable,
    NotFound,
    VerificationFailed,
)
from mirror.keys import SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The resources (paths, every method) that need ``Authorization: Bearer <MIRROR_API_TOKEN>``,
# filled by the app factory.
TOKEN_RESOURCES = web.AppKey("token_resources", set[web.AbstractResource])
# Mirror errors a request can cause, and the status each one is answered with.
STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (VerificationFailed, 401),
    (BadRequest, 400),          # UnknownResource too
    (AmbiguousObject, 400),
    (NotFound, 404),
    (DatabaseUnavailable, 503),
)
_ANSWERED = tuple(kind for kind, _ in STATUSES)


def json_answer(body: object, status: int = 200,
                headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer, rendered by orjson (the stdlib encoder showed in the ingress profile)."""
    return web.json_response(body, status=status, headers=headers, dumps=parsing.dumps)


def reason(status: int, text: str, **headers: str) -> web.Response:
    """A short JSON answer ``{"error": text}``."""
    return json_answer({"error": text}, status=status, headers=headers or None)


def authorised(request: web.Request) -> bool:
    """True when the request carries ``Authorization: Bearer <MIRROR_API_TOKEN>``."""
    expected = request.app[SETTINGS].api_token
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    # Constant time: the comparison does not reveal how much of the token matched, nor its
    # length. Header bytes that are not UTF-8 arrive as surrogates: compare them as they came.
    given = token.strip().encode("utf-8", errors="surrogateescape")
    return hmac.compare_digest(given, expected.encode())


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 for a path in ``TOKEN_RESOURCES`` without the right bearer token."""
    resource = request.match_info.route.resource
    if resource in request.app[TOKEN_RESOURCES] and not authorised(request):
        return reason(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A mirror error raised by a handler, answered with its status and message."""
    try:
        return await handler(request)
    except _ANSWERED as exc:
        status = next(code for kind, code in STATUSES if isinstance(exc, kind))
        if status == 503:  # the message may name hosts; say only what the client needs
            return reason(503, "database unavailable", **{"Retry-After": "5"})
        return reason(status, str(exc))


async def expect_handler(request: web.Request) -> None:
    """The ``Expect`` header: ``100-continue`` is honoured; anything else is answered 417.

    aiohttp's own handler quotes the header in its 417 text, and a value that is not UTF-8
    then fails to encode, which answered 500; this one does not echo it.
    """
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
        return
    raise web.HTTPExpectationFailed(text='{"error": "unsupported Expect header"}',
                                    content_type="application/json")
