"""The resource registry: every module of this package that defines ``RESOURCE``.

Table and resource names used in SQL come from here, never from a request.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import projections
from projections.base import Resource, normalise_kind


@cache
def resources() -> tuple[Resource, ...]:
    """All resources, sorted by name."""
    found: list[Resource] = []
    for info in pkgutil.iter_modules(projections.__path__):
        if info.name in {"base", "registry"}:
            continue
        module = importlib.import_module(f"projections.{info.name}")
        resource = getattr(module, "RESOURCE", None)
        if isinstance(resource, Resource):
            found.append(resource)
    names = [r.name for r in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two resource modules share a name: {sorted(names)}")
    named = {r.name: r for r in found}
    for resource in found:
        if resource.list_parent is None:
            continue
        parent = named.get(resource.list_parent)
        if parent is None or parent.list_path is None or parent.list_parent is not None:
            raise RuntimeError(f"{resource.name}: list_parent {resource.list_parent!r} is not "
                               "a resource with its own top-level list endpoint")
        if parent.walk_order >= resource.walk_order:
            raise RuntimeError(f"{resource.name}: walk_order must come after its list_parent's")
    return tuple(sorted(found, key=lambda r: r.name))


def listed() -> tuple[Resource, ...]:
    """The resources the Trackstar REST API lists, in walk order (then by name)."""
    return tuple(sorted((r for r in resources() if r.list_path is not None),
                        key=lambda r: (r.walk_order, r.name)))


@cache
def _by_kind() -> dict[str, Resource]:
    table: dict[str, Resource] = {}
    for resource in resources():
        for kind in resource.events:
            if kind in table:
                raise RuntimeError(
                    f"event {kind} claimed by {table[kind].name} and {resource.name}")
            table[kind] = resource
    return table


def for_event(event_type: str) -> Resource | None:
    """The resource an event type routes to, or None when the type is unknown."""
    return _by_kind().get(normalise_kind(event_type))


def by_name(name: str) -> Resource | None:
    """A resource by name; ``-`` and ``_`` are equivalent, case-insensitive."""
    wanted = name.strip().lower().replace("-", "_")
    for resource in resources():
        if resource.name == wanted:
            return resource
    return None
