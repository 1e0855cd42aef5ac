"""Tests for mirror.paths: dotted paths, revert, diff and changes."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.paths import PathError, Reverted, changes, diff, resolve, revert, to_pointer

# --------------------------------------------------------------------------
# helpers


def strict_equal(a: Any, b: Any) -> bool:
    """Exact JSON equality that also tells 1, 1.0 and True apart."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(strict_equal(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(strict_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and a == b


def equal_modulo_null(result: Any, old: Any) -> bool:
    """Strict equality, except a key whose value is None in ``result`` may be absent in ``old``."""
    if isinstance(old, dict):
        if not isinstance(result, dict):
            return False
        if any(key not in result for key in old):
            return False
        for key, value in result.items():
            if key in old:
                if not equal_modulo_null(value, old[key]):
                    return False
            elif value is not None:
                return False
        return True
    if isinstance(old, list):
        return (
            isinstance(result, list)
            and len(result) == len(old)
            and all(equal_modulo_null(x, y) for x, y in zip(result, old, strict=True))
        )
    return type(result) is type(old) and result == old


def check_patches(data: dict[str, Any], reverted: Reverted) -> None:
    assert isinstance(reverted.reverse, jsonpatch.JsonPatch)
    assert isinstance(reverted.forward, jsonpatch.JsonPatch)
    assert strict_equal(jsonpatch.apply_patch(reverted.previous, reverted.forward), data)
    assert strict_equal(jsonpatch.apply_patch(data, reverted.reverse), reverted.previous)


def test_helpers_are_strict() -> None:
    assert not strict_equal({"a": 1}, {"a": True})
    assert not strict_equal([1], [1.0])
    assert equal_modulo_null({"a": None}, {})
    assert not equal_modulo_null({"a": 0}, {})
    assert not equal_modulo_null({}, {"a": None})
    assert not equal_modulo_null([None], [])


# --------------------------------------------------------------------------
# resolve / to_pointer


ORDER: dict[str, Any] = {
    "id": "ord_1",
    "line_items": [
        {"sku": "A", "received_quantity": 0},
        {"sku": "B", "received_quantity": 2},
    ],
}


def test_resolve_issue_example() -> None:
    assert resolve(ORDER, "line_items.1.received_quantity") == [
        "line_items",
        1,
        "received_quantity",
    ]


def test_resolve_numeric_looking_dict_key_stays_string() -> None:
    assert resolve({"a": {"0": {"1": 5}}}, "a.0.1") == ["a", "0", "1"]
    assert resolve({"a": [[5, 6]]}, "a.0.1") == ["a", 0, 1]


def test_resolve_prefers_longest_existing_dotted_key() -> None:
    doc = {"a.b": {"c": 1}, "a": {"b": {"c": 2}}}
    assert resolve(doc, "a.b.c") == ["a.b", "c"]
    assert resolve({"a": {"b": {"c": 2}}}, "a.b.c") == ["a", "b", "c"]
    assert resolve({"x": {"a.b.c": 1, "a": 2}}, "x.a.b.c") == ["x", "a.b.c"]


def test_resolve_outside_existing_structure() -> None:
    # missing key: a key containing dots matches before a nested path (README: "How time and order work")
    assert resolve({}, "a.0.b") == ["a.0.b"]
    assert resolve({"x": {}}, "x.a.b") == ["x", "a.b"]
    # index == length on a list is still an index; after it, digits are keys
    assert resolve({"a": [1]}, "a.1.0") == ["a", 1, "0"]
    # unicode digits are not indices
    assert resolve({"a": [1, 2, 3]}, "a.\u00b2") == ["a", "\u00b2"]


def test_to_pointer_escapes() -> None:
    assert to_pointer(["a/b", "c~d", 0, "~1"]) == "/a~1b/c~0d/0/~01"
    assert to_pointer([]) == ""
    assert to_pointer([""]) == "/"


# --------------------------------------------------------------------------
# revert examples


def test_revert_issue_example() -> None:
    data = copy.deepcopy(ORDER)
    data["line_items"][1]["received_quantity"] = 3
    before = copy.deepcopy(data)
    reverted = revert(data, {"line_items.1.received_quantity": 2})
    assert reverted.previous == ORDER
    assert data == before  # not mutated
    assert list(reverted.reverse) == [
        {"op": "replace", "path": "/line_items/1/received_quantity", "value": 2}
    ]
    assert list(reverted.forward) == [
        {"op": "replace", "path": "/line_items/1/received_quantity", "value": 3}
    ]
    check_patches(data, reverted)


def test_revert_numeric_dict_key() -> None:
    data = {"bins": {"0": "X", "1": "Y"}}
    reverted = revert(data, {"bins.0": "OLD"})
    assert reverted.previous == {"bins": {"0": "OLD", "1": "Y"}}
    check_patches(data, reverted)


def test_revert_dotted_key_when_longer_key_exists() -> None:
    data = {"a.b": 1, "a": {"b": 2}}
    reverted = revert(data, {"a.b": 0})
    assert reverted.previous == {"a.b": 0, "a": {"b": 2}}
    check_patches(data, reverted)


def test_revert_dotted_path_when_only_prefix_key_exists() -> None:
    data = {"a": {"b": 2}}
    reverted = revert(data, {"a.b": 0})
    assert reverted.previous == {"a": {"b": 0}}
    check_patches(data, reverted)


def test_revert_keys_with_slash_and_tilde() -> None:
    data = {"a/b": {"c~d": 1}, "~": 2}
    reverted = revert(data, {"a/b.c~d": 0, "~": 1})
    assert reverted.previous == {"a/b": {"c~d": 0}, "~": 1}
    paths = sorted(op["path"] for op in reverted.reverse)
    assert paths == ["/a~1b/c~0d", "/~0"]
    check_patches(data, reverted)


def test_revert_whole_array_and_whole_object() -> None:
    data = {"tags": ["x"], "address": {"city": "B", "zip": "2"}, "n": 1}
    prev_attrs = {"tags": ["x", "y", "z"], "address": {"city": "A"}}
    reverted = revert(data, prev_attrs)
    assert reverted.previous == {"tags": ["x", "y", "z"], "address": {"city": "A"}, "n": 1}
    check_patches(data, reverted)
    # the previous value is copied, not shared
    reverted.previous["tags"].append("w")
    assert prev_attrs["tags"] == ["x", "y", "z"]


def test_revert_whole_value_applied_before_leaves_under_it() -> None:
    data = {"items": [{"q": 1}]}
    # the leaf is under the whole array given under a shorter path
    reverted = revert(data, {"items.1.q": 7, "items": [{"q": 0}, {"q": 5}]})
    assert reverted.previous == {"items": [{"q": 0}, {"q": 7}]}
    check_patches(data, reverted)


def test_revert_field_that_did_not_exist() -> None:
    data = {"a": 1}
    reverted = revert(data, {"b.c.d": 5, "e": None})
    # a removed key that itself contains dots comes back as that key, not as b -> c -> d
    assert reverted.previous == {"a": 1, "b.c.d": 5, "e": None}
    forward = list(reverted.forward)
    assert {"op": "remove", "path": "/b.c.d"} in forward
    assert {"op": "remove", "path": "/e"} in forward
    check_patches(data, reverted)


def test_revert_null_means_null_or_absent() -> None:
    data = {"note": "hi"}
    reverted = revert(data, {"note": None})
    assert reverted.previous == {"note": None}


def test_revert_array_that_grew() -> None:
    # the update appended an element: previously the array was shorter
    data = {"items": [1, 2, 3]}
    reverted = revert(data, {"items": [1, 2]})
    assert reverted.previous == {"items": [1, 2]}
    assert jsonpatch.apply_patch(reverted.previous, reverted.forward) == data
    check_patches(data, reverted)


def test_revert_array_that_shrank() -> None:
    data = {"items": [{"q": 1}]}
    reverted = revert(data, {"items.1": {"q": 2}})  # index == length appends
    assert reverted.previous == {"items": [{"q": 1}, {"q": 2}]}
    assert list(reverted.forward) == [{"op": "remove", "path": "/items/1"}]
    check_patches(data, reverted)
    nested = revert(data, {"items.1.q": 2})  # intermediate element appended
    assert nested.previous == {"items": [{"q": 1}, {"q": 2}]}
    check_patches(data, nested)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"items": [1]}, "items.3"),  # index beyond the end
        ({"items": [1]}, "items.3.q"),
        ({"a": 5}, "a.b"),  # through a scalar
        ({"a": None}, "a.b"),  # through null
        ({"a": "text"}, "a.0"),
        ({"items": [1]}, "items.x"),  # key on an array
    ],
)
def test_revert_impossible_path(data: dict[str, Any], path: str) -> None:
    before = copy.deepcopy(data)
    with pytest.raises(PathError, match="cannot place"):
        revert(data, {path: 1})
    assert data == before


def test_revert_type_aware() -> None:
    data = {"flag": 1}
    reverted = revert(data, {"flag": True})
    assert reverted.previous["flag"] is True
    assert list(reverted.reverse) == [{"op": "replace", "path": "/flag", "value": True}]
    check_patches(data, reverted)


# --------------------------------------------------------------------------
# diff / changes examples


def test_diff_issue_example() -> None:
    new = copy.deepcopy(ORDER)
    new["line_items"][1]["received_quantity"] = 3
    assert diff(ORDER, new) == {"line_items.1.received_quantity": 2}
    assert changes(ORDER, new) == [("line_items.1.received_quantity", 2, 3)]


def test_diff_added_removed_and_resized() -> None:
    old = {"a": 1, "gone": {"x": 1}, "arr": [1, 2], "t": [1]}
    new = {"a": 1, "added": 5, "arr": [1, 2, 3], "t": {"0": 1}}
    assert diff(old, new) == {"added": None, "gone": {"x": 1}, "arr": [1, 2], "t": [1]}
    assert changes(old, new) == [
        ("added", None, 5),
        ("arr", [1, 2], [1, 2, 3]),
        ("gone", {"x": 1}, None),
        ("t", [1], {"0": 1}),
    ]


def test_diff_ambiguous_dotted_key_falls_back_to_parent() -> None:
    old = {"a": {"b": {"c": 1}}, "a.b": 0}
    new = {"a": {"b": {"c": 2}}, "a.b": 0}
    d = diff(old, new)
    assert d == {"a": {"b": {"c": 1}}}
    assert revert(new, d).previous == old
    assert [path for path, _o, _n in changes(old, new)] == ["a"]


def test_diff_dotted_key_round_trips() -> None:
    old = {"x": {"a.b": 1, "c": 1}}
    new = {"x": {"a.b": 2, "c": 1}}
    d = diff(old, new)
    assert d == {"x.a.b": 1}
    assert revert(new, d).previous == old


def test_diff_removed_nested_dotted_key_emits_parent() -> None:
    old = {"x": {"a.b": 1, "c": 1}}
    new = {"x": {"c": 1}}
    d = diff(old, new)
    assert d == {"x": {"a.b": 1, "c": 1}}
    assert revert(new, d).previous == old


def test_diff_removed_top_level_dotted_key_is_unrepresentable() -> None:
    with pytest.raises(PathError):
        diff({"a.b": 1}, {})
    assert changes({"a.b": 1}, {}) == [("a.b", 1, None)]


def test_diff_empty_path_raises() -> None:
    with pytest.raises(PathError):
        diff([1], [2])
    with pytest.raises(PathError):
        changes({"a": 1}, None)


def test_diff_and_changes_of_equal_documents_are_empty() -> None:
    assert diff(ORDER, copy.deepcopy(ORDER)) == {}
    assert changes(ORDER, copy.deepcopy(ORDER)) == []
    assert diff({"a": 1}, {"a": 1.0}) == {"a": 1}  # type-aware


# --------------------------------------------------------------------------
# property tests

KEYS = st.text(alphabet="ab.~/01", max_size=3)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False, width=16)
    | st.text(alphabet="xy.", max_size=2)
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=12,
)
DOCS = st.dictionaries(KEYS, JSON, max_size=4)


@st.composite
def edited(draw: st.DrawFn, value: Any) -> Any:
    """A random edit of ``value``: same, replaced, or containers edited inside."""
    action = draw(st.integers(0, 9))
    if action == 0:
        return draw(JSON)
    if isinstance(value, dict) and action > 2:
        return draw(edited_dict(value))
    if isinstance(value, list) and action > 2:
        items = [draw(edited(item)) for item in value]
        resize = draw(st.sampled_from(["keep", "grow", "shrink"]))
        if resize == "grow":
            items.extend(draw(st.lists(JSON, min_size=1, max_size=2)))
        elif resize == "shrink" and items:
            del items[draw(st.integers(0, len(items) - 1)) :]
        return items
    if action in (1, 2):
        return draw(SCALARS)
    return value


@st.composite
def edited_dict(draw: st.DrawFn, value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        choice = draw(st.sampled_from(["keep", "edit", "edit", "drop"]))
        if choice == "keep":
            out[key] = item
        elif choice == "edit":
            out[key] = draw(edited(item))
    for key in draw(st.lists(KEYS, max_size=2)):
        out.setdefault(key, draw(JSON))
    return out


@st.composite
def old_new(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    old = draw(DOCS)
    return old, draw(edited_dict(old))


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(old_new())
def test_property_diff_revert_round_trip(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    old, new = pair
    new_before = copy.deepcopy(new)
    if any("." in key and key not in new for key in old):
        with pytest.raises(PathError):
            diff(old, new)
        return
    d = diff(old, new)
    assert (d == {}) == strict_equal(old, new)
    reverted = revert(new, d)
    assert equal_modulo_null(reverted.previous, old)
    assert strict_equal(new, new_before)  # data not mutated
    check_patches(new, reverted)


@PROPERTY
@given(old_new())
def test_property_changes(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    old, new = pair
    rows = changes(old, new)
    paths = [path for path, _o, _n in rows]
    assert paths == sorted(paths)
    assert len(set(paths)) == len(paths)
    assert (rows == []) == strict_equal(old, new)
    for _path, old_value, new_value in rows:
        # a row without a visible difference is a key added with value None
        assert not strict_equal(old_value, new_value) or old_value is None
    if any("." in key and key not in new for key in old):
        return
    d = diff(old, new)
    assert list(d) == paths
    for path, old_value, new_value in rows:
        assert strict_equal(d[path], old_value)
        # the new value is what the path resolves to in ``new`` (None if absent)
        node: Any = new
        for segment in resolve(new, path):
            if isinstance(node, dict) and segment in node:
                node = node[segment]
            elif isinstance(node, list) and isinstance(segment, int) and segment < len(node):
                node = node[segment]
            else:
                node = None
                break
        assert strict_equal(node, new_value)


PATH_PARTS = st.lists(
    st.sampled_from(["a", "b", "a.b", "0", "1", "2", "~", "/", ""]), min_size=1, max_size=4
)


@PROPERTY
@given(DOCS, st.dictionaries(PATH_PARTS.map(".".join), JSON, max_size=4))
def test_property_revert_patches_are_exact(
    data: dict[str, Any], previous_attributes: dict[str, Any]
) -> None:
    before = copy.deepcopy(data)
    try:
        reverted = revert(data, previous_attributes)
    except PathError:
        assert strict_equal(data, before)
        return
    assert strict_equal(data, before)
    check_patches(data, reverted)
    if previous_attributes:
        # the entry applied last (longest path, then greatest) is visible in previous
        last = max(previous_attributes, key=lambda path: (path.count("."), path))
        node: Any = reverted.previous
        for segment in resolve(reverted.previous, last):
            node = node[segment]
        assert strict_equal(node, previous_attributes[last])
