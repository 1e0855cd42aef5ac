"""The pure fold (README: "How time and order work"): laws checked with hypothesis over generated event sets.

- Any permutation and duplication of a set of events gives the same timeline.
- Folding a page onto what an earlier fold stored (re-folding only from the page's earliest
  instant, as the projector does) equals one full fold of every event.
- For every prefix of an arrival sequence, deciding "the state at T as known at K" among the
  candidates received by K (what mirror.candidate_at does in SQL) equals the fold of that
  prefix alone: no later delivery changes an earlier answer.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mirror import ksuid
from mirror.fold import (
    Candidate,
    Event,
    Prior,
    candidates_of,
    fold,
    fold_from,
    state_hash,
    unique,
)
from projections import registry

ORDER = registry.by_name("order")
assert ORDER is not None
T0 = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
STATUSES = ["open", "picked", "packed", "shipped"]


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def make_event(n: int, minute: int, status: str, *, prev: tuple[int, str] | None,
               with_time: bool, kind: str = "order.updated", extra: dict[str, Any] | None = None,
               received: int = 0) -> Event:
    data: dict[str, Any] = {"id": "o1", "status": status, "updated_date": iso(
        T0 + timedelta(minutes=minute)), "created_date": iso(T0), **(extra or {})}
    previous = None
    if prev is not None:
        previous = {"status": prev[1]}
        if with_time:
            previous["updated_date"] = iso(T0 + timedelta(minutes=prev[0]))
    sent = T0 + timedelta(minutes=minute, seconds=n)
    msg = ksuid.message_id(sent, n.to_bytes(16, "big"))
    return Event(n, msg, kind, kind, T0 + timedelta(days=1, seconds=received), data, previous,
                 {"connection_id": "c1", "event_type": kind})


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """A true history of an order and the webhooks it sent, some lost, some at one instant."""
    steps = draw(st.integers(1, 6))
    minute = 0
    truth: list[tuple[int, str]] = []
    for _ in range(steps):
        minute += draw(st.sampled_from([0, 1, 5]))  # 0: two states at one instant
        truth.append((minute, draw(st.sampled_from(STATUSES))))
    events = []
    for i, (m, status) in enumerate(truth):
        if i > 0 and not draw(st.booleans()) and i < len(truth) - 1:
            continue  # this webhook never arrived
        prev = truth[i - 1] if i > 0 else None
        kind = "order.created" if i == 0 else draw(st.sampled_from(
            ["order.updated", "order.updated", "order.shipment.created"]))
        extra = {"note": None} if draw(st.integers(0, 4)) == 0 else None  # null ≡ absent
        events.append(make_event(i, m, status, prev=prev, with_time=draw(st.booleans()),
                                 kind=kind, extra=extra))
    if draw(st.booleans()):
        last = truth[-1][0] + draw(st.sampled_from([0, 3]))
        events.append(Event(99, ksuid.message_id(T0 + timedelta(minutes=last), b"x" * 16),
                            "order.deleted", "order.deleted", T0 + timedelta(days=1),
                            {"id": "o1", "deleted_date": iso(T0 + timedelta(minutes=last))},
                            None, {}))
    return events


def timeline(result: Any) -> list[tuple[Any, ...]]:
    return [(c.valid_from, c.valid_to, c.deleted, None if c.deleted else state_hash(c.data),
             c.derived) for c in sorted(result.versions, key=lambda c: c.valid_from)]


def findings(result: Any) -> set[tuple[Any, ...]]:
    return {(a.kind, a.at, a.event_id, a.paths) for a in result.anomalies}


def changes(result: Any) -> set[tuple[Any, ...]]:
    return {(c.changed_at, c.path, repr(c.old_value), repr(c.new_value)) for c in result.changes}


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_any_permutation_and_duplication_gives_the_same_timeline(
        events: list[Event], rnd: Any) -> None:
    reference = fold(ORDER, events)
    shuffled = events + [rnd.choice(events) for _ in range(rnd.randint(0, 3))]
    rnd.shuffle(shuffled)
    again = fold(ORDER, shuffled)
    assert timeline(again) == timeline(reference)
    assert findings(again) == findings(reference)
    assert changes(again) == changes(reference)
    # Consecutive versions always differ, and none has zero length.
    versions = timeline(reference)
    for before, after in itertools.pairwise(versions):
        assert before[1] == after[0] and before[0] < after[0]
        assert (before[2], before[3]) != (after[2], after[3])


def _incremental(events: list[Event], split: int) -> Any:
    """Fold ``events[:split]``, then fold the rest onto what that stored, from the rest's
    earliest instant on, as the projector does."""
    first = fold(ORDER, events[:split]) if split else None
    stored: list[Candidate] = list(first.candidates) if first else []
    new: list[Candidate] = []
    for e in events[split:]:
        new += candidates_of(ORDER, e)[0]
    if not new:
        return first
    t = min(c.valid_from for c in new)
    winners = [c for c in stored if c.wins and c.valid_from < t]
    prior = None
    if winners:
        w = max(winners, key=lambda c: c.valid_from)
        prior = Prior(w.valid_from, w.data, w.state_hash, w.deleted, w.event_id, w.position,
                      w.derived)
    again: list[Candidate] = []
    for e in events[:split]:
        again += [c for c in candidates_of(ORDER, e)[0] if c.valid_from >= t]
    received = [c.valid_from for c in stored if not c.derived]
    tail = fold_from(ORDER, prior, unique(again + new), min(received, default=None))
    for c in winners:
        if prior is not None and c.valid_from == prior.valid_from:
            c.valid_to = tail.prior_valid_to
    kept = [c for c in stored if c.valid_from < t]
    tail.candidates = kept + tail.candidates
    return tail


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.integers(0, 10))
def test_folding_a_page_onto_the_stored_tail_equals_a_full_fold(
        events: list[Event], rnd: Any, cut: int) -> None:
    rnd.shuffle(events)
    split = min(cut, len(events))
    assert timeline(_incremental(events, split)) == timeline(fold(ORDER, events))


def decide_known(cands: list[Candidate], at: datetime, known: datetime) -> Any:
    """The answer mirror.candidate_at gives, in Python: the latest instant at or before
    ``at`` among candidates known by ``known``, decided among those alone."""
    seen = [c for c in cands if c.known_from <= known and c.valid_from <= at]
    if not seen:
        return None
    instant = max(c.valid_from for c in seen)
    here = [c for c in seen if c.valid_from == instant]
    revealers = [c for c in here if not c.derived and not c.deleted]

    def sink(c: Candidate) -> bool:
        return not any(b.prev_hash == c.state_hash and b.state_hash != c.state_hash
                       for b in revealers)

    winner = max(here, key=lambda c: (c.deleted, not c.derived, sink(c), c.sent_at,
                                      c.event_id))
    return None if winner.deleted else state_hash(winner.data)


def state_at(result: Any, at: datetime) -> Any:
    live = [c for c in result.versions if c.valid_from <= at]
    if not live:
        return None
    last = max(live, key=lambda c: c.valid_from)
    return None if last.deleted else state_hash(last.data)


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_known_at_answer_is_the_fold_of_what_had_arrived(events: list[Event], rnd: Any) -> None:
    rnd.shuffle(events)
    # The n-th delivery arrives at second n: the candidates' known_from follows arrival.
    arrived = [Event(e.position, e.event_id, e.event_type, e.kind,
                     T0 + timedelta(days=1, seconds=n), e.data, e.previous_attributes,
                     e.envelope) for n, e in enumerate(events)]
    everything = fold(ORDER, arrived).candidates
    instants = [*sorted({c.valid_from for c in everything}), T0 + timedelta(days=3)]
    for n in range(1, len(arrived) + 1):
        known = T0 + timedelta(days=1, seconds=n - 1)
        prefix = fold(ORDER, arrived[:n])
        for at in instants:
            assert decide_known(everything, at, known) == state_at(prefix, at), (n, at)
