"""Connected groups of a graph: sections joined by registered pairs, tiles by used pairs."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

N = TypeVar("N", bound=Hashable)


def groups(nodes: Sequence[N], links: Iterable[tuple[N, N]]) -> dict[N, N]:
    """Each node's group (a representative node) under the links between nodes (union-find)."""
    parent = {n: n for n in nodes}

    def root(n: N) -> N:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in links:
        parent[root(a)] = root(b)
    return {n: root(n) for n in nodes}


def closed_loops(links: Sequence[tuple[N, N]]) -> int:
    """Independent closed loops the links form: links - nodes + connected groups."""
    nodes = list(dict.fromkeys(n for link in links for n in link))
    return len(links) - len(nodes) + len(set(groups(nodes, links).values()))
