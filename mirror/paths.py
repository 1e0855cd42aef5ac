"""Dotted paths of Trackstar ``previous_attributes`` and the patches between states.

A Trackstar webhook envelope carries ``data`` (the object after an update, in
full) and ``previous_attributes``: for each changed field its previous value,
keyed by a dotted path into ``data``.  Integer segments index arrays, other
segments are object keys, so ``"line_items.1.received_quantity": 1`` is the
old ``data["line_items"][1]["received_quantity"]``.

This module turns such dotted paths into concrete segments (:func:`resolve`),
RFC 6901 JSON Pointers (:func:`to_pointer`), reverts an update to obtain the
state before it together with RFC 6902 patches in both directions
(:func:`revert`), and computes the inverse -- a ``previous_attributes``-style
dict for two states (:func:`diff`) and a field-level change list
(:func:`changes`).

Semantic choices, shared by all functions:

* JSON has no "absent" marker, so a previous value of ``null`` for a key that
  exists now means "it was null or absent"; :func:`revert` sets it to
  ``null``, and :func:`diff` emits ``None`` for keys that were added.
* Values are compared type-aware: ``1``, ``1.0`` and ``true`` are different
  values (Python's ``==`` treats them as equal), so a change between them is
  reported and patched.
* A key containing ``.`` can only be created by :func:`revert` as part of a
  whole parent value: a dotted path never resolves to a key that does not
  exist yet and contains a ``.``.  :func:`diff` therefore falls back to the
  whole parent value for such keys, and raises :class:`PathError` when the
  parent is the document itself.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonpatch
import orjson

__all__ = [
    "PathError",
    "Reverted",
    "changes",
    "diff",
    "resolve",
    "revert",
    "same_json",
    "to_pointer",
]

Segment = str | int
"""One resolved path segment: a key of an object, or an index of an array."""

_INDEX = re.compile(r"[0-9]+")
"""Decimal digits only; ``str.isdigit`` would also accept e.g. ``"²"``."""

# (segments relative to a node as raw strings, old value, new value)
_Entry = tuple[list[str], Any, Any]


class PathError(ValueError):
    """A dotted path cannot be placed on (or produced for) a document."""


@dataclass(frozen=True)
class Reverted:
    """The outcome of :func:`revert`.

    ``previous`` is the state before the update, ``reverse`` applied to
    ``data`` gives ``previous`` and ``forward`` applied to ``previous`` gives
    ``data`` back exactly.
    """

    data: dict[str, Any]
    previous: dict[str, Any]

    # The patches are built on first use: the projector only needs ``previous``, and building
    # both patches costs more than the revert itself.
    @functools.cached_property
    def reverse(self) -> jsonpatch.JsonPatch:
        """Applied to ``data``, gives ``previous``."""
        return _make_patch(self.data, self.previous)

    @functools.cached_property
    def forward(self) -> jsonpatch.JsonPatch:
        """Applied to ``previous``, gives ``data`` exactly."""
        return _make_patch(self.previous, self.data)


# --------------------------------------------------------------------------
# resolving dotted paths


def _is_index(segment: str) -> bool:
    return _INDEX.fullmatch(segment) is not None


def resolve(doc: Any, dotted: str) -> list[str | int]:
    """Split ``dotted`` into path segments by walking the actual structure of ``doc``.

    * At a list node a segment of ASCII decimal digits becomes an ``int``
      index; at a dict node every segment is a key, even a numeric-looking one
      (``"0"`` stays the string key ``"0"``).
    * At a dict node, keys containing ``.`` are matched against the keys
      actually present: the longest run of the remaining segments joined by
      ``.`` that is an existing key wins, then shorter runs; if none exists a
      single segment is used (the field did not exist).
    * When no key matches at a dict node, the rest of the path is one key:
      a key that itself contains dots matches before a nested path, so a
      removed ``"a.b"`` comes back as the key ``"a.b"``, not as ``a`` → ``b``.
    * Once the walk leaves the existing structure otherwise (index past the
      end, a scalar, or a non-index segment on a list) the remaining segments
      are taken one each, as string keys.

    ``resolve`` only splits; it never raises.  Whether the segments can be
    placed on ``doc`` is checked by :func:`revert`.
    """
    parts = dotted.split(".")
    segments: list[str | int] = []
    node: Any = doc
    inside = True  # ``node`` is part of the existing structure
    i = 0
    while i < len(parts):
        if inside and isinstance(node, dict):
            for j in range(len(parts), i, -1):
                key = ".".join(parts[i:j])
                if key in node:
                    segments.append(key)
                    node = node[key]
                    i = j
                    break
            else:
                # Nothing exists here: a key that itself contains dots matches before a
                # nested path, so the rest of the path is one (new) key.
                segments.append(".".join(parts[i:]))
                break
        elif inside and isinstance(node, list) and _is_index(parts[i]):
            index = int(parts[i])
            segments.append(index)
            if index < len(node):
                node = node[index]
            else:
                inside = False
            i += 1
        else:
            segments.append(parts[i])
            inside = False
            i += 1
    return segments


def to_pointer(segments: Iterable[str | int]) -> str:
    """Return the RFC 6901 JSON Pointer for ``segments``.

    ``~`` is escaped as ``~0`` and ``/`` as ``~1``; no segments give ``""``
    (the whole document).
    """
    return "".join("/" + str(segment).replace("~", "~0").replace("/", "~1") for segment in segments)


# --------------------------------------------------------------------------
# comparing and patching


def _same(a: Any, b: Any) -> bool:
    """Type-aware JSON equality (``1``, ``1.0`` and ``True`` all differ)."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict or kind is list:
        # Serialising in C is far cheaper than walking in Python; equal text means equal
        # values (types included). Unequal text may still be equal dicts in another key order.
        try:
            if orjson.dumps(a) == orjson.dumps(b):
                return True
        except (TypeError, orjson.JSONEncodeError):
            pass
        if kind is dict:
            return a.keys() == b.keys() and all(_same(value, b[key]) for key, value in a.items())
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def same_json(a: Any, b: Any) -> bool:
    """Type-aware JSON equality: ``1``, ``1.0`` and ``true`` all differ."""
    return _same(a, b)


def _patch_ops(src: Any, dst: Any, path: list[str | int], ops: list[dict[str, Any]]) -> None:
    """Append RFC 6902 operations turning ``src`` into ``dst`` (exactly) to ``ops``.

    The operations touch disjoint locations, so their order only matters for
    the removal of trailing array elements, which are removed last-first.
    """
    if _same(src, dst):
        return
    if isinstance(src, dict) and isinstance(dst, dict):
        for key in src:
            if key not in dst:
                ops.append({"op": "remove", "path": to_pointer([*path, key])})
        for key, value in dst.items():
            if key in src:
                _patch_ops(src[key], value, [*path, key], ops)
            else:
                ops.append(
                    {"op": "add", "path": to_pointer([*path, key]), "value": _copy(value)}
                )
        return
    if isinstance(src, list) and isinstance(dst, list):
        common = min(len(src), len(dst))
        for index in range(common):
            _patch_ops(src[index], dst[index], [*path, index], ops)
        for index in range(len(src) - 1, common - 1, -1):
            ops.append({"op": "remove", "path": to_pointer([*path, index])})
        for index in range(common, len(dst)):
            ops.append(
                {
                    "op": "add",
                    "path": to_pointer([*path, index]),
                    "value": _copy(dst[index]),
                }
            )
        return
    ops.append({"op": "replace", "path": to_pointer(path), "value": _copy(dst)})


def _make_patch(src: Any, dst: Any) -> jsonpatch.JsonPatch:
    ops: list[dict[str, Any]] = []
    _patch_ops(src, dst, [], ops)
    return jsonpatch.JsonPatch(ops)


# --------------------------------------------------------------------------
# revert


def _describe(node: Any) -> str:
    if node is None:
        return "null"
    return type(node).__name__


def _owned_child(node: Any, key: Any, owned: set[int]) -> Any:
    """``node[key]``, copied (shallowly) first unless this revert made it."""
    child = node[key]
    if isinstance(child, dict | list) and id(child) not in owned:
        child = dict(child) if isinstance(child, dict) else list(child)
        owned.add(id(child))
        node[key] = child
    return child


def _place(doc: dict[str, Any], dotted: str, value: Any, owned: set[int]) -> None:
    """Set ``value`` at ``dotted`` on ``doc`` (in place), creating what is missing and copying
    each shared container on the way before changing it."""
    if "." not in dotted:
        doc[dotted] = value  # a top-level field: nothing to resolve, nothing shared to copy
        return
    segments = resolve(doc, dotted)
    node: Any = doc
    for depth, segment in enumerate(segments):
        last = depth == len(segments) - 1
        if isinstance(node, dict):
            key = str(segment)
            if last:
                node[key] = value
            elif key in node:
                node = _owned_child(node, key, owned)
            else:
                node[key] = {}
                node = node[key]
                owned.add(id(node))
        elif isinstance(node, list):
            where = to_pointer(segments[:depth]) or "the document root"
            if not isinstance(segment, int):
                raise PathError(
                    f"cannot place {dotted!r}: segment {segment!r} is not an index "
                    f"but {where} is an array"
                )
            if segment > len(node):
                raise PathError(
                    f"cannot place {dotted!r}: index {segment} is beyond the end of the "
                    f"array at {where} (length {len(node)})"
                )
            if segment == len(node):
                node.append(value if last else {})
                node = node[-1]
                owned.add(id(node))
            elif last:
                node[segment] = value
            else:
                node = _owned_child(node, segment, owned)
        else:
            where = to_pointer(segments[:depth]) or "the document root"
            raise PathError(
                f"cannot place {dotted!r}: it goes through a {_describe(node)} at {where}"
            )


def revert(data: dict[str, Any], previous_attributes: Mapping[str, Any]) -> Reverted:
    """Undo an update: apply ``previous_attributes`` to a copy of ``data``.

    Entries are applied shortest path first (by number of dotted segments,
    then by path), so a whole sub-object or array given under a shorter path
    is in place before any leaf under it is applied; each path is resolved
    with :func:`resolve` against the state built so far.  A value may be a
    scalar, ``null``, a whole array or a whole sub-object.

    A field that does not exist in ``data`` is created with its previous
    value: missing intermediate objects are created, and an array index equal
    to the array's length appends.  An index further beyond the end, a key
    on an array, or a path going through a scalar (including ``null``) raises
    :class:`PathError`.

    JSON has no "absent" marker, so a previous value of ``null`` for a key
    that exists in ``data`` means "it was null or absent"; it is set to
    ``null`` (the key is kept).

    ``data`` and ``previous_attributes`` are never mutated.  The returned
    ``reverse`` patch turns ``data`` into ``previous`` and ``forward`` turns
    ``previous`` back into exactly ``data``, removing keys that ``revert``
    created and trimming array elements that it appended.
    """
    if not isinstance(data, dict):
        raise PathError(f"data must be an object, not {_describe(data)}")
    # Copy on write: only the containers on the changed paths are copied; the rest of the
    # state is shared with ``data`` (neither is ever mutated afterwards).
    previous: dict[str, Any] = dict(data)
    owned: set[int] = {id(previous)}
    ordered = sorted(previous_attributes.items(), key=lambda kv: (kv[0].count("."), kv[0]))
    for dotted, value in ordered:
        _place(previous, dotted, _copy(value), owned)
    return Reverted(data=data, previous=previous)


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (much cheaper than copy.deepcopy for JSON trees)."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


# --------------------------------------------------------------------------
# diff / changes


def _unambiguous(key: str, entries: Sequence[_Entry], keys: Iterable[str]) -> bool:
    """Whether ``key`` + ``.`` + each entry's path resolves to ``key`` first.

    :func:`resolve` prefers the longest existing key, so none of the longer
    candidates ``key.p1``, ``key.p1.p2``, ... may be a key of the object --
    in the new state or re-created from the old one while reverting.
    """
    present = set(keys)
    for rel, _old, _new in entries:
        rest = ".".join(rel).split(".")
        for stop in range(1, len(rest) + 1):
            if key + "." + ".".join(rest[:stop]) in present:
                return False
    return True


def _diff_node(old: Any, new: Any) -> list[_Entry] | None:
    """Entries relative to a node whose values differ, or None for "emit it whole"."""
    if isinstance(old, dict) and isinstance(new, dict):
        return _diff_dict(old, new, at_root=False, strict=True)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        entries: list[_Entry] = []
        for index, (old_item, new_item) in enumerate(zip(old, new, strict=True)):
            if _same(old_item, new_item):
                continue
            sub = _diff_node(old_item, new_item)
            if sub is None:
                entries.append(([str(index)], old_item, new_item))
            else:
                entries.extend(([str(index), *rel], o, n) for rel, o, n in sub)
        return entries
    return None


def _diff_dict(
    old: dict[str, Any], new: dict[str, Any], *, at_root: bool, strict: bool
) -> list[_Entry] | None:
    keys = old.keys() | new.keys()
    entries: list[_Entry] = []
    for key in old:
        if key in new:
            if _same(old[key], new[key]):
                continue
            sub = _diff_node(old[key], new[key])
            if sub is None or not _unambiguous(key, sub, keys):
                entries.append(([key], old[key], new[key]))
            else:
                entries.extend(([key, *rel], o, n) for rel, o, n in sub)
        elif "." in key and (strict or not at_root):
            # A removed key containing "." cannot be re-created by a dotted path.
            if at_root:
                raise PathError(
                    f"cannot express the removal of top-level key {key!r}: a dotted path "
                    "never re-creates a key containing '.' (there is no parent to emit whole)"
                )
            return None
        else:
            entries.append(([key], old[key], None))
    for key in new:
        if key not in old:
            entries.append(([key], None, new[key]))
    return entries


def _top_entries(old: Any, new: Any, *, strict: bool) -> list[tuple[str, Any, Any]]:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        raise PathError(
            f"both states must be objects to express their difference as dotted paths "
            f"(got {_describe(old)} and {_describe(new)}); the empty path is not supported"
        )
    entries = _diff_dict(old, new, at_root=True, strict=strict)
    assert entries is not None  # at the root, _diff_dict raises instead
    result = [
        (".".join(rel), _copy(old_value), _copy(new_value))
        for rel, old_value, new_value in entries
    ]
    result.sort(key=lambda entry: entry[0])
    return result


def diff(old: Any, new: Any) -> dict[str, Any]:
    """Return a ``previous_attributes``-style dict (dotted path -> old value).

    ``revert(new, diff(old, new)).previous`` equals ``old`` up to the
    null-vs-absent rule: keys present in ``new`` but absent in ``old`` appear
    with value ``None`` (and are reverted to ``null``).

    Both sides are compared type-aware.  Dicts are recursed into, as are
    arrays of equal length (element-wise); arrays of different lengths and
    type changes give the whole old value under the shorter path.  Keys
    removed in ``new`` appear with their old value.  Paths are built so that
    :func:`resolve` finds exactly the intended keys, also when keys contain
    ``.``: when a dotted path would be ambiguous (e.g. a key ``"a.b"`` beside
    a key ``"a"``), or would have to re-create a removed key containing
    ``.``, the whole value of the nearest enclosing field that can be named
    safely is emitted instead.

    Raises :class:`PathError` when ``old`` and ``new`` are not both dicts
    (the empty path), or when a top-level key containing ``.`` was removed
    (no dotted path can re-create it and there is no parent to emit whole).
    """
    return {path: old_value for path, old_value, _new in _top_entries(old, new, strict=True)}


def changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """Return the field-level changes from ``old`` to ``new`` as ``(path, old, new)``.

    The rows are sorted by dotted path.  They are leaf-level where both sides
    are dicts or arrays of equal length, and use the same paths as
    :func:`diff` (including its whole-value fallbacks for ambiguous dotted
    keys), so every path is a valid ``previous_attributes`` key and paths are
    unique.  A field that was added has old value ``None``; a field that was
    removed has new value ``None``.  Unlike :func:`diff`, the removal of a
    top-level key containing ``.`` is reported as a row under that key.

    Raises :class:`PathError` when ``old`` and ``new`` are not both dicts.
    """
    return _top_entries(old, new, strict=False)
