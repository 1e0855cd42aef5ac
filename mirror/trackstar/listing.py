"""Which resources the REST API lists, in which order, and every object of a list.

The paths and the walk order are declared by each resource in ``projections/`` (``list_path``,
``list_parent``, ``walk_order``); nothing here keeps a map of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from mirror.errors import BadRequest, UnknownResource
from mirror.trackstar.client import MAX_PAGE_SIZE, Page, TrackstarClient, TrackstarError
from projections import registry
from projections.base import Resource


def select_resources(names: Iterable[str] | None) -> list[Resource]:
    """The resources to walk, in walk order; every name must have a list endpoint."""
    available = registry.listed()
    if not names:
        return list(available)
    wanted: set[str] = set()
    for name in names:
        found = registry.by_name(name)
        if found is None:
            raise UnknownResource(name)
        if found.list_path is None:
            raise BadRequest(f"the Trackstar API has no list endpoint for {found.name}; "
                             f"choose from {', '.join(r.name for r in available)}")
        wanted.add(found.name)
    return [r for r in available if r.name in wanted]


async def list_all(client: TrackstarClient, path: str, filters: Mapping[str, str],
                   page_size: int = MAX_PAGE_SIZE) -> list[dict[str, Any]]:
    """Every object of one list endpoint, in memory; raises if any page fails, so a list
    returned is a complete one."""
    out: list[dict[str, Any]] = []
    token: str | None = None
    seen: set[str] = set()
    while True:
        page = await client.list_page(path, filters, token, page_size)
        out.extend(page.data)
        token = next_token(page, seen, path)
        if token is None:
            return out


def next_token(page: Page, seen: set[str], path: str) -> str | None:
    """The page's ``next_token``; an error if the API hands out a token twice (a loop)."""
    token = page.next_token
    if token is not None:
        if token in seen:
            raise TrackstarError(200, f"{path}: the API returned page token {token!r} twice")
        seen.add(token)
    return token


async def endpoints_of(client: TrackstarClient, resource: Resource,
                       page_size: int = MAX_PAGE_SIZE) -> list[str]:
    """The list paths of a resource: its own, or one per object of its ``list_parent``."""
    if resource.list_path is None:
        raise BadRequest(f"the Trackstar API has no list endpoint for {resource.name}")
    if resource.list_parent is None:
        return [resource.list_path]
    parent = registry.by_name(resource.list_parent)
    assert parent is not None and parent.list_path is not None  # checked by the registry
    parents = await list_all(client, parent.list_path, {}, page_size)
    ids = sorted({str(p["id"]) for p in parents
                  if isinstance(p.get("id"), str | int) and not isinstance(p.get("id"), bool)})
    return [resource.list_path.format(parent_id=quote(i, safe="")) for i in ids]
