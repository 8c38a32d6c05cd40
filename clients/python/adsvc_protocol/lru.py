"""A bounded, thread-safe, weighted LRU: the one cache class of the in-process client,
the SDK and the server."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LRUCache:
    """get/put with least-recently-used eviction; counts hits and misses.

    Bounded by entry count (`capacity`) and by the total weight of the entries
    (`max_weight`, e.g. compiled nodes or bytes; 0 = unbounded): eviction runs until
    both hold, and an item heavier than the whole weight budget is not cached at all.
    """

    def __init__(self, capacity: int, max_weight: int = 0):
        self.capacity = capacity
        self.max_weight = max_weight
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        """The item cached under `key` (now the most recently used), or None."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, item, weight: int = 1) -> None:
        """Cache `item` under `key`, evicting the least recently used entries until both
        bounds hold; nothing is stored if capacity is 0 or `weight` alone is over budget."""
        if self.capacity <= 0 or (self.max_weight and weight > self.max_weight):
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self._items[key] = (item, weight)
            self.weight += weight
            while self._items and (len(self._items) > self.capacity or
                                   (self.max_weight and self.weight > self.max_weight)):
                _, (_, w) = self._items.popitem(last=False)
                self.weight -= w

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts stay)."""
        with self._lock:
            self._items.clear()
            self.weight = 0

    def __len__(self) -> int:
        return len(self._items)
