"""A bounded, thread-safe, weighted LRU: the one cache class of the in-process client,
the SDK and the server."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

Weight = int | tuple[int, ...]


class LRUCache:
    """get/put with least-recently-used eviction; counts hits and misses.

    Bounded by entry count (`capacity`) and by the total weight of the entries
    (`max_weight`, e.g. compiled nodes or bytes; 0 = unbounded). A weight may be a tuple
    such as (bytes, nodes) with one budget per component. Eviction runs until every
    bound holds, and an item heavier than a whole budget is not cached at all.
    """

    def __init__(self, capacity: int, max_weight: Weight = 0):
        self.capacity = capacity
        self.max_weight = max_weight
        self._budgets = max_weight if isinstance(max_weight, tuple) else (max_weight,)
        self._items: OrderedDict[Hashable, tuple[Any, tuple[int, ...]]] = OrderedDict()
        self._lock = threading.Lock()
        self._weights = [0] * len(self._budgets)
        self.hits = 0
        self.misses = 0

    @property
    def weight(self) -> Weight:
        """The total weight held (a tuple when the budgets are one)."""
        w = tuple(self._weights)
        return w if isinstance(self.max_weight, tuple) else w[0]

    def get(self, key: Hashable):
        """The cached item for `key` (now the most recently used), or None on a miss."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found[0]

    def peek(self, key: Hashable):
        """The cached item for `key`, or None; neither counted nor made recent."""
        found = self._items.get(key)
        return None if found is None else found[0]

    def put(self, key: Hashable, item, weight: Weight = 1) -> None:
        """Cache `item` under `key`, evicting the least recently used entries until every
        bound holds; nothing is stored if capacity is 0 or `weight` alone is over budget."""
        w = weight if isinstance(weight, tuple) else (weight,)
        if self.capacity <= 0 or self._over(w):
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._add(old[1], -1)
            self._items[key] = (item, w)
            self._add(w, 1)
            while self._items and (len(self._items) > self.capacity
                                   or self._over(self._weights)):
                _, (_, dropped) = self._items.popitem(last=False)
                self._add(dropped, -1)

    def _over(self, weights) -> bool:
        return any(b and w > b for w, b in zip(weights, self._budgets))

    def _add(self, w: tuple[int, ...], sign: int) -> None:
        for i, x in enumerate(w):
            self._weights[i] += sign * x

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts stay)."""
        with self._lock:
            self._items.clear()
            self._weights = [0] * len(self._budgets)

    def __len__(self) -> int:
        return len(self._items)
