"""The fold: one object's events in, its timeline out. Pure, no I/O.

The README's "How time and order work", in code. Every event yields its *candidates* on its
own, whatever else exists: the state it carries (or its deletion), placed at the object's own
time, and — for an update whose ``previous_attributes`` carry an earlier ``updated_date`` —
the state it reveals, placed at that time. The fold then walks the instants in time order and
decides each one by the set of candidates at it alone:

    deletion > received > derived; among received, a state that another one at the same
    instant reveals as its predecessor comes first; then the svix-id time (for snapshots, the
    fetch time), then the id's text; the last one holds.

Because a candidate depends on its own event only, the store can keep every candidate with the
time it became known (``known_from``) and answer "the state at T as known at K" by deciding
the same way among the candidates known by K (mirror/history.sql does exactly that in SQL).

The live projector, `mirror rebuild` and the tests share ``candidates_of`` and ``fold_from``:
a full fold is ``fold_from(resource, None, every candidate)``, and a late event re-folds only
from its own instant onward, starting from the version in force just before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson

from mirror import ksuid, paths
from projections.base import Resource, parse_time

# A payload time more than this far after the event was sent is a WMS clock bug (§5).
CLOCK_SKEW = timedelta(minutes=5)
_UPDATE_TIMES = ("updated_date", "trackstar_updated_date", "last_seen")
_CREATE_TIMES = ("created_date", "trackstar_created_date")
# Kinds the fold itself finds (and so may resolve when a re-fold no longer finds them).
FOLD_KINDS = ("missed_webhook", "conflict", "inconsistent", "clock_skew", "unplaceable")


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
    origin: str = "webhook"


@dataclass(frozen=True)
class Anomaly:
    """Something the set of events shows to be wrong or missing."""

    kind: str  # one of FOLD_KINDS
    at: datetime
    event_id: str
    paths: tuple[str, ...]
    detail: dict[str, Any]


@dataclass(slots=True)
class Candidate:
    """One state an event claims for its object at one instant (or the object's deletion)."""

    valid_from: datetime
    known_from: datetime          # when the mirror received the carrying/revealing event
    position: int                 # that event's log position
    event_id: str
    event_type: str
    sent_at: datetime             # svix-id time; for snapshots, when they were fetched
    derived: bool                 # revealed by previous_attributes
    deleted: bool
    data: dict[str, Any] | None   # None when deleted
    state_hash: bytes | None      # equality of states: null ≡ absent, JSON types kept
    prev_hash: bytes | None = None        # the predecessor this received update reveals
    stored: bool = False          # data must be stored: it is not the event's own data
    # A revealed state that could not be placed in time: (named paths, the state), checked
    # against the state just before this candidate's instant.
    check: tuple[tuple[str, ...], dict[str, Any]] | None = None
    wins: bool = False            # part of the collapsed timeline of every event counted
    valid_to: datetime | None = None
    envelope: Mapping[str, Any] | None = None  # for resources that merge partial events
    previous: Mapping[str, Any] | None = None  # a received update's previous_attributes
    changes: list[tuple[str, Any, Any]] | None = None  # winners: fields changed from before

    def rank(self, predecessors: set[bytes]) -> tuple[bool, bool, bool, datetime, str]:
        """The order that decides one instant; the greatest holds (see the module doc)."""
        sink = self.deleted or self.derived or self.state_hash not in predecessors
        return (self.deleted, not self.derived, sink, self.sent_at, self.event_id)


class Change(NamedTuple):
    """One changed dotted path between two consecutive versions."""

    changed_at: datetime
    path: str
    old_value: Any
    new_value: Any
    event_id: str
    derived: bool


@dataclass(frozen=True)
class Prior:
    """The version in force just before a re-fold's first instant (None: there is none)."""

    valid_from: datetime
    data: dict[str, Any] | None
    state_hash: bytes | None
    deleted: bool
    event_id: str
    position: int
    derived: bool
    known_from: datetime | None = None


@dataclass
class Folded:
    """What a fold from some instant on produces."""

    candidates: list[Candidate]           # every candidate from that instant on, to store
    anomalies: list[Anomaly]
    changes: list[Change]
    prior_valid_to: datetime | None       # the prior version's new end (None: still current)
    current: Candidate | Prior | None     # the version in force after the last instant

    @property
    def versions(self) -> list[Candidate]:
        return [c for c in self.candidates if c.wins]


# ---------------------------------------------------------------------------------------------
# States and their equality


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def state_hash(data: Mapping[str, Any]) -> bytes:
    """A digest equal for equal states: a null field and an absent one are the same, and
    values compare as JSON (``1`` is not ``true``, key order does not matter)."""
    text = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    if b"null" in text:
        text = orjson.dumps(_strip_nulls(data), option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(text, digest_size=16).digest()


def same_value(a: Any, b: Any) -> bool:
    """JSON equality with null ≡ absent (for the values at one path)."""
    return orjson.dumps(_strip_nulls(a), option=orjson.OPT_SORT_KEYS) == \
        orjson.dumps(_strip_nulls(b), option=orjson.OPT_SORT_KEYS)


# ---------------------------------------------------------------------------------------------
# One event's candidates


_CREATED: dict[str, frozenset[str]] = {}


def _created_kinds(resource: Resource) -> frozenset[str]:
    # `order.created` counts, `order.shipment.created` does not (its data is the whole order,
    # but its created_date is the order's, not the time of this state).
    found = _CREATED.get(resource.name)
    if found is None:
        found = _CREATED[resource.name] = frozenset(
            k for k in resource.events if k.endswith(".created") and k.count(".") == 1)
    return found


def sent_time(event: Event) -> datetime:
    """When the event was sent: the svix-id's KSUID time; for a snapshot (backfill,
    reconcile, fetch) or an id that is not a KSUID, when the mirror received it."""
    if event.origin == "webhook":
        at = ksuid.time_of(event.event_id)
        if at is not None:
            return at
    return event.received_at


def object_time(resource: Resource, event: Event, deleting: bool) -> tuple[datetime, bool]:
    """(the object's own time for this event, whether a payload field gave it)."""
    names: tuple[str, ...] = _UPDATE_TIMES
    if deleting:
        names = ("deleted_date", *names)
    if event.kind in _created_kinds(resource):
        names = (*names, *_CREATE_TIMES)
    for name in names:
        parsed = parse_time(event.data.get(name))
        if parsed is not None:
            return parsed, True
    return ksuid.time_of(event.event_id) or event.received_at, False


def candidates_of(resource: Resource, event: Event) -> tuple[list[Candidate], list[Anomaly]]:
    """The candidates one event yields on its own (its state, and the state it reveals when
    that has an earlier time of its own), and the anomalies it shows by itself."""
    anomalies: list[Anomaly] = []
    deleting = event.kind in resource.deletes
    sent = sent_time(event)
    at, from_payload = object_time(resource, event, deleting)
    if from_payload and at > sent + CLOCK_SKEW:
        anomalies.append(Anomaly("clock_skew", sent, event.event_id, (),
                                 {"claimed": at.isoformat(), "placed": sent.isoformat()}))
        at = sent
    merged = resource.state is not None
    data = None if deleting else event.data
    received = Candidate(at, event.received_at, event.position, event.event_id,
                         event.event_type, sent, False, deleting, data,
                         None if data is None else state_hash(data), stored=merged,
                         envelope=event.envelope if merged else None)
    out = [received]
    previous = event.previous_attributes
    if previous and data is not None and not merged:
        try:
            before = paths.revert(data, previous).previous
        except (paths.PathError, ValueError, TypeError, KeyError, IndexError) as exc:
            anomalies.append(Anomaly("unplaceable", at, event.event_id, tuple(sorted(previous)),
                                     {"error": str(exc)[:500]}))
            return out, anomalies
        received.prev_hash = state_hash(before)
        received.previous = previous
        revealed_at = parse_time(before.get("updated_date")) if "updated_date" in previous \
            else None
        if revealed_at is not None and revealed_at < at:
            out.append(Candidate(revealed_at, event.received_at, event.position, event.event_id,
                                 event.event_type, sent, True, False, before, received.prev_hash,
                                 stored=True))
        else:
            received.check = (tuple(sorted(previous)), before)
    return out, anomalies


# ---------------------------------------------------------------------------------------------
# The fold


def _value_at(doc: Any, dotted: str) -> Any:
    if "." not in dotted:
        return doc.get(dotted) if isinstance(doc, dict) else None
    node = doc
    for segment in paths.resolve(doc, dotted):
        if isinstance(node, dict) and isinstance(segment, str):
            node = node.get(segment)
        elif isinstance(node, list) and isinstance(segment, int) and segment < len(node):
            node = node[segment]
        else:
            return None
    return node


def _decide(cands: list[Candidate]) -> tuple[Candidate, set[bytes]]:
    """The candidate that holds at one instant, and the predecessor states it stands on."""
    received = [c for c in cands if not c.derived and not c.deleted]
    predecessors = {c.prev_hash for c in received
                    if c.prev_hash is not None and c.prev_hash != c.state_hash}
    winner = max(cands, key=lambda c: c.rank(predecessors))
    chain: set[bytes] = set()
    frontier = [winner.state_hash] if winner.state_hash is not None else []
    while frontier:
        h = frontier.pop()
        for c in received:
            if c.state_hash == h and c.prev_hash is not None and c.prev_hash not in chain:
                chain.add(c.prev_hash)
                frontier.append(c.prev_hash)
    return winner, chain


def _changed_paths(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[str, ...]:
    if a is None or b is None:
        return ()
    try:
        return tuple(p for p, old, new in paths.changes(a, b) if not same_value(old, new))
    except paths.PathError:
        return ()


def fold_from(resource: Resource, prior: Prior | None, candidates: Iterable[Candidate],
              first_received: datetime | None = None) -> Folded:
    """The timeline from the earliest of ``candidates`` on, given the version in force just
    before it (``prior``) and the earliest instant of any received event of the object
    (``first_received``, for missed webhooks). ``candidates`` must be every candidate of the
    object at or after that instant."""
    by_instant: dict[datetime, list[Candidate]] = {}
    for c in candidates:
        by_instant.setdefault(c.valid_from, []).append(c)
        if not c.derived and (first_received is None or c.valid_from < first_received):
            first_received = c.valid_from
    merged = resource.state is not None
    anomalies: list[Anomaly] = []
    changes: list[Change] = []
    kept: list[Candidate] = []
    current: Candidate | Prior | None = prior
    prior_valid_to: datetime | None = None
    last_winner: Candidate | None = None
    for instant in sorted(by_instant):
        cands = by_instant[instant]
        before = current
        before_data = None if before is None or before.deleted else before.data
        if merged:
            winner = _merge_instant(resource, cands, before_data)
            chain: set[bytes] = set()
        else:
            winner, chain = _decide(cands)
        for c in cands:
            c.wins = False
            c.valid_to = None
            c.changes = None
            if c.derived and any(not r.derived and not r.deleted and r.state_hash == c.state_hash
                                 and r.known_from <= c.known_from for r in cands):
                continue  # never decides anything: an equal received state is always known
            kept.append(c)
        if not merged and not winner.deleted:
            _check_instant(cands, winner, chain, before, anomalies)
        same = before is not None and (
            (before.deleted and winner.deleted)
            or (not before.deleted and not winner.deleted
                and before.state_hash == winner.state_hash))
        if same:
            continue  # consecutive equal states are one version, valid from the earlier
        winner.wins = True
        if last_winner is None:
            prior_valid_to = instant
        else:
            last_winner.valid_to = instant
        last_winner = winner
        if winner.derived and first_received is not None and first_received < instant:
            anomalies.append(Anomaly(
                "missed_webhook", instant, winner.event_id,
                _changed_paths(before_data, winner.data),
                {"after": before.event_id if before is not None else None}))
        if before_data is not None and winner.data is not None:
            winner.changes = _changes(before, before_data, winner)
            changes.extend(Change(instant, p, old, new, winner.event_id, winner.derived)
                           for p, old, new in winner.changes)
        current = winner
    return Folded(kept, anomalies, changes, prior_valid_to, current)


def _changes(before: Candidate | Prior | None, before_data: dict[str, Any],
             winner: Candidate) -> list[tuple[str, Any, Any]]:
    """The changed fields from one version to the next. When the update says exactly which
    fields it changed (it reveals the very state before it), its own dotted paths are used, as
    Trackstar wrote them; otherwise the two states are compared."""
    assert winner.data is not None
    previous = winner.previous
    if previous is not None and before is not None and winner.prev_hash == before.state_hash:
        out = []
        for path in sorted(previous):
            new = _value_at(winner.data, path)
            if not paths.same_json(previous[path], new):
                out.append((path, previous[path], new))
        return out
    try:
        return paths.changes(before_data, winner.data)
    except paths.PathError:
        return []


def _merge_instant(resource: Resource, cands: list[Candidate],
                   state: dict[str, Any] | None) -> Candidate:
    """For resources whose events each carry part of the object (the connection): the
    candidates at one instant merge, in the deciding order, into the state before it."""
    ordered = sorted(cands, key=lambda c: c.rank(set()))
    for c in ordered:
        if c.deleted:
            state = None
        else:
            assert c.data is not None
            state = resource.next_state(state, c.data, c.envelope or {})
    winner = ordered[-1]
    if not winner.deleted:
        winner.data = state
        winner.state_hash = state_hash(state or {})
    return winner


def _check_instant(cands: list[Candidate], winner: Candidate, chain: set[bytes],
                   before: Candidate | Prior | None, anomalies: list[Anomaly]) -> None:
    """Conflicts at one instant, and revealed states without a time of their own that do not
    match the state before it."""
    for c in cands:
        if c is winner or c.deleted or c.state_hash == winner.state_hash \
                or c.state_hash in chain:
            continue
        anomalies.append(Anomaly("conflict", c.valid_from, c.event_id,
                                 _changed_paths(winner.data, c.data),
                                 {"kept": winner.event_id}))
    hashes = {c.state_hash for c in cands}
    before_data = None if before is None or before.deleted else before.data
    for c in cands:
        if c.check is None or before_data is None:
            continue
        named, revealed = c.check
        if c.prev_hash in hashes:
            continue  # it reveals a state received at this very instant
        differing = tuple(p for p in named
                          if not same_value(_value_at(revealed, p), _value_at(before_data, p)))
        if differing:
            anomalies.append(Anomaly("inconsistent", c.valid_from, c.event_id, differing,
                                     {"after": before.event_id if before else None}))


def fold(resource: Resource, events: Sequence[Event]) -> Folded:
    """The whole timeline of one object from the set of its events."""
    cands: list[Candidate] = []
    anomalies: list[Anomaly] = []
    for event in events:
        found, shown = candidates_of(resource, event)
        cands += found
        anomalies += shown
    result = fold_from(resource, None, unique(cands))
    result.anomalies[:0] = anomalies
    return result


def unique(cands: Iterable[Candidate]) -> list[Candidate]:
    """One candidate per (event, derived): an event delivered or loaded twice counts once."""
    seen: dict[tuple[int, bool], Candidate] = {}
    for c in cands:
        seen.setdefault((c.position, c.derived), c)
    return list(seen.values())
