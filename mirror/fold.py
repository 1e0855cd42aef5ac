"""The fold: one object's events in, its whole history out. Pure, no I/O.

The live projector, `mirror rebuild` and point-in-time reconstruction all use this one
function, so they cannot disagree. An object's history is a function of the *set* of its
events: the events are sorted by the object's own time before anything else happens.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mirror import paths
from projections.base import Resource, parse_time

_KSUID_EPOCH = 1_400_000_000
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62 = {c: i for i, c in enumerate(_BASE62)}
_TIME_FIELDS = ("updated_date", "trackstar_updated_date", "last_seen", "created_date",
                "trackstar_created_date")
_DELETE_TIME_FIELDS = ("deleted_date", "updated_date", "trackstar_updated_date", "last_seen")


@dataclass(frozen=True)
class Event:
    """One projectable event of one object, as read from the log."""

    position: int
    event_id: str
    event_type: str
    kind: str
    received_at: datetime
    data: dict[str, Any]
    previous_attributes: dict[str, Any] | None = None
    envelope: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Version:
    """One state of an object and the interval in which it held."""

    seq: int
    valid_from: datetime
    valid_to: datetime | None
    data: dict[str, Any] | None      # None: deleted
    event_id: str
    event_type: str
    derived: bool
    known_from: datetime
    position: int


@dataclass(frozen=True)
class Change:
    """One changed dotted path between two consecutive versions."""

    seq: int
    changed_at: datetime
    path: str
    old_value: Any
    new_value: Any
    event_id: str
    derived: bool


@dataclass(frozen=True)
class Anomaly:
    """Something the set of events shows to be wrong or missing."""

    kind: str  # 'missed_webhook' | 'inconsistent' | 'conflict' | 'unplaceable'
    at: datetime
    event_id: str
    paths: tuple[str, ...]
    detail: dict[str, Any]


@dataclass(frozen=True)
class History:
    """Everything the fold derives for one object."""

    versions: tuple[Version, ...]
    changes: tuple[Change, ...]
    anomalies: tuple[Anomaly, ...]
    # A partial history (from fold_append) starts at the stored tail version: the rows before
    # it are unchanged and are not repeated here.
    partial: bool = False

    @property
    def current(self) -> Version | None:
        return self.versions[-1] if self.versions else None


@functools.lru_cache(maxsize=65536)
def ksuid_time(message_id: str) -> datetime | None:
    """The creation time encoded in a Svix message id (``msg_`` + 27-char KSUID), if any."""
    text = message_id.rsplit("_", 1)[-1]
    if len(text) != 27:
        return None
    number = 0
    for char in text:
        digit = _B62.get(char)
        if digit is None:
            return None
        number = number * 62 + digit
    if number >= 1 << 160:
        return None
    seconds = number >> 128
    try:
        return datetime.fromtimestamp(_KSUID_EPOCH + seconds, tz=UTC)
    except (OverflowError, ValueError, OSError):
        return None


def object_time(event: Event, deleting: bool) -> datetime:
    """The object's own time for an event: payload timestamps, then svix-id, then arrival."""
    for name in _DELETE_TIME_FIELDS if deleting else _TIME_FIELDS:
        parsed = parse_time(event.data.get(name))
        if parsed is not None:
            return parsed
    return ksuid_time(event.event_id) or event.received_at


@dataclass
class _Candidate:
    valid_from: datetime
    derived: bool
    position: int
    event: Event
    data: dict[str, Any] | None

    def key(self) -> tuple[datetime, int, int]:
        # Received beats derived at one instant; then ties keep log order (CONTRACT §5).
        return (self.valid_from, 0 if self.derived else 1, self.position)


def fold(resource: Resource, events: Sequence[Event]) -> History:
    """Every version, change and anomaly of one object, from the set of its events."""
    history = _fold(resource, events, None)
    assert history is not None
    return history


def fold_append(resource: Resource, tail: Version, events: Sequence[Event]) -> History | None:
    """The history that ``events`` add after the stored last version ``tail``, or None when
    any of them (or a state one reveals) belongs before it: then only a full fold is right.

    The result is partial: its first version is ``tail`` with its new ``valid_to``; the
    anomalies and changes are the new ones. A full fold of every event gives the same rows.
    """
    return _fold(resource, events, tail)


def _candidates(resource: Resource, events: Sequence[Event]) -> list[_Candidate]:
    out = []
    for event in events:
        deleting = event.kind in resource.deletes
        out.append(_Candidate(object_time(event, deleting), False, event.position, event,
                              None if deleting else event.data))
    return out


def _seed(tail: Version) -> _Candidate:
    event = Event(tail.position, tail.event_id, tail.event_type, "", tail.known_from,
                  tail.data or {})
    return _Candidate(tail.valid_from, tail.derived, tail.position, event, tail.data)


def _fold(resource: Resource, events: Sequence[Event], tail: Version | None) -> History | None:
    received = _candidates(resource, events)
    base = 0
    if tail is not None:
        seed = _seed(tail)
        if any(c.key() <= seed.key() for c in received):
            return None
        received.append(seed)
        base = tail.seq
    received.sort(key=_Candidate.key)
    # Resources with partial payloads merge each event into the state before it.
    if resource.state is not None:
        state: dict[str, Any] | None = None
        for cand in received:
            if tail is not None and cand is received[0]:
                state = cand.data
                continue
            if cand.data is not None:
                state = resource.next_state(state, cand.data, cand.event.envelope)
                cand.data = state
            else:
                state = None
    anomalies: list[Anomaly] = []
    _same_instant(received, anomalies)
    derived = _revealed(received, anomalies)
    if tail is not None and any(c.key() <= received[0].key() for c in derived):
        return None
    timeline = _place(received, derived, anomalies)
    versions: list[Version] = []
    for index, cand in enumerate(timeline):
        seq = base + index
        valid_to = timeline[index + 1].valid_from if index + 1 < len(timeline) else None
        versions.append(Version(seq, cand.valid_from, valid_to, cand.data, cand.event.event_id,
                                cand.event.event_type, cand.derived, cand.event.received_at,
                                cand.position))
    changes: list[Change] = []
    for before, after in itertools.pairwise(versions):
        if before.data is None or after.data is None:
            continue
        for path, old, new in paths.changes(before.data, after.data):
            changes.append(Change(after.seq, after.valid_from, path, old, new, after.event_id,
                                  after.derived))
    return History(tuple(versions), tuple(changes), tuple(anomalies), partial=tail is not None)


def _revealed(received: list[_Candidate], anomalies: list[Anomaly]) -> list[_Candidate]:
    """States revealed by reverting each update's previous_attributes, at their own time.

    A revealed state without a time of its own is checked against the received state just
    before it instead: a difference means a change whose webhook never arrived, at a time
    nobody told us ('inconsistent')."""
    out: list[_Candidate] = []
    for index, cand in enumerate(received):
        event = cand.event
        previous = event.previous_attributes
        if not previous or cand.data is None or event.data is not cand.data:
            continue
        try:
            before = paths.revert(event.data, previous).previous
        except (paths.PathError, ValueError, TypeError, KeyError, IndexError) as exc:
            anomalies.append(Anomaly("unplaceable", cand.valid_from, event.event_id,
                                     tuple(sorted(previous)), {"error": str(exc)[:500]}))
            continue
        at = parse_time(before.get("updated_date")) if "updated_date" in previous else None
        if at is None or at >= cand.valid_from:
            prior = received[index - 1] if index else None
            if prior is not None and prior.data is not None:
                # The revealed state keeps the update's own timestamps when previous_attributes
                # does not carry them: those are not a difference.
                differing = tuple(p for p, old, new in paths.changes(prior.data, before)
                                  if not (old is None and new is None)
                                  and p not in _TIME_FIELDS)
                if differing:
                    anomalies.append(Anomaly("inconsistent", cand.valid_from, event.event_id,
                                             differing, {"after": prior.event.event_id}))
            continue
        out.append(_Candidate(at, True, cand.position, event, before))
    return out


def _same_instant(received: list[_Candidate], anomalies: list[Anomaly]) -> None:
    """Two received events claiming one instant with different states: the later in order
    wins (log order) and the other is recorded as a conflict."""
    for before, after in itertools.pairwise(received):
        if before.valid_from == after.valid_from and before.data != after.data:
            anomalies.append(_conflict(before, after))


def _place(received: list[_Candidate], derived: list[_Candidate],
           anomalies: list[Anomaly]) -> list[_Candidate]:
    """Merge derived states into the received timeline, recording what they reveal."""
    if not derived:
        return received
    by_instant: dict[datetime, list[_Candidate]] = {}
    for cand in received:
        by_instant.setdefault(cand.valid_from, []).append(cand)
    kept: dict[datetime, _Candidate] = {}
    for cand in sorted(derived, key=_Candidate.key):
        claims = by_instant.get(cand.valid_from)
        if claims:
            # A received event's own data wins; a different revealed state is a conflict.
            if all(c.data != cand.data for c in claims):
                anomalies.append(_conflict(cand, claims[-1]))
            continue
        other = kept.get(cand.valid_from)
        if other is not None:
            if other.data != cand.data:
                anomalies.append(_conflict(cand, other))
            continue
        kept[cand.valid_from] = cand
    timeline = sorted([*received, *kept.values()], key=_Candidate.key)
    previous_received: _Candidate | None = None
    for cand in timeline:
        if not cand.derived:
            previous_received = cand
            continue
        # A revealed state after some received one, at an instant no received event claims,
        # is a change whose webhook never arrived. Before every received event it is simply
        # the object's past.
        if previous_received is not None:
            changed: tuple[str, ...] = ()
            if previous_received.data is not None and cand.data is not None:
                changed = tuple(p for p, _, _ in paths.changes(previous_received.data, cand.data))
            anomalies.append(Anomaly("missed_webhook", cand.valid_from, cand.event.event_id,
                                     changed, {"after": previous_received.event.event_id}))
    return timeline


def _conflict(loser: _Candidate, winner: _Candidate) -> Anomaly:
    changed: tuple[str, ...] = ()
    if loser.data is not None and winner.data is not None:
        changed = tuple(p for p, _, _ in paths.changes(winner.data, loser.data))
    return Anomaly("conflict", loser.valid_from, loser.event.event_id, changed,
                   {"kept": winner.event.event_id})
