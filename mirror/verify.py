"""Svix signature verification on the raw body bytes, against every configured secret."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from svix.webhooks import Webhook, WebhookVerificationError

from mirror.errors import VerificationFailed

# ASCII only, matched whole (fullmatch: "$" would also accept a trailing newline, and "\d"
# any Unicode digit, which float() would then accept as a timestamp).
_ID_RE = re.compile(r"[\x21-\x7e]{1,255}")
_TS_RE = re.compile(r"[0-9]{1,12}")
_MAX_SIGNATURE_HEADER = 4096


@dataclass(frozen=True)
class Delivery:
    """The verified Svix headers of one delivery attempt."""

    message_id: str
    timestamp: datetime


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Svix spells them svix-*, white-labelled senders webhook-*; both are accepted.
    value = headers.get(f"svix-{name}")
    if value is None:
        value = headers.get(f"webhook-{name}")
    return value


class Verifier:
    """Verifies deliveries against one or more secrets; any one verifying is enough."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self._hooks = tuple(Webhook(secret) for secret in secrets)

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Delivery:
        """Return the delivery's id and timestamp, or raise VerificationFailed with a reason.

        ``headers`` must be case-insensitive (aiohttp's CIMultiDict is). The svix library is
        called on the raw bytes; every exception it can raise becomes a VerificationFailed.
        """
        msg_id = _header(headers, "id")
        timestamp = _header(headers, "timestamp")
        signature = _header(headers, "signature")
        if not msg_id or not timestamp or not signature:
            raise VerificationFailed("missing svix-id, svix-timestamp or svix-signature header")
        if not _ID_RE.fullmatch(msg_id):
            raise VerificationFailed("malformed svix-id header")
        if not _TS_RE.fullmatch(timestamp):
            raise VerificationFailed("malformed svix-timestamp header")
        if len(signature) > _MAX_SIGNATURE_HEADER:
            raise VerificationFailed("svix-signature header too long")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise VerificationFailed("body is not valid UTF-8") from None
        clean = {"svix-id": msg_id, "svix-timestamp": timestamp, "svix-signature": signature}
        reason = "no matching signature"
        for hook in self._hooks:
            try:
                hook.verify(body, clean)
            except WebhookVerificationError as exc:
                text = str(exc).lower()
                if "too old" in text:
                    raise VerificationFailed("timestamp too old (more than 5 minutes)") from None
                if "too new" in text:
                    raise VerificationFailed(
                        "timestamp too new (more than 5 minutes ahead)") from None
                continue
            except Exception:
                # The library leaks ValueError (entry without a comma), binascii.Error (bad
                # base64) and UnicodeDecodeError; all of them mean "not authentic".
                reason = "malformed svix-signature header"
                continue
            return Delivery(msg_id, datetime.fromtimestamp(int(timestamp), tz=UTC))
        raise VerificationFailed(reason)
