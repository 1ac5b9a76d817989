"""Bounded memos of the host's per-call work, and the one way to forget them all.

A call's validation verdict, kernel choice, launch arguments, tensor maps and launch configuration
depend only on metadata (shapes, strides, addresses, devices), so each is remembered under that
metadata and a server that reuses its buffers pays a dict lookup. The number of distinct keys in a
server is bounded by its buffers and batch sizes; the bound of each memo only guards against a
caller cycling through unbounded ones, and a full memo simply starts over.
"""

from __future__ import annotations

import weakref

_memos: "weakref.WeakSet[BoundedMemo]" = weakref.WeakSet()


class BoundedMemo:
    """A dict that empties itself when it reaches `limit` entries.

    `get` is the dict's own method (the hot path: no Python frame). Values stored must not change
    after they are stored, so threads read them without a lock; two threads that miss at once both
    compute the value and one of them is kept.
    """

    __slots__ = ("get", "_entries", "_limit", "__weakref__")

    def __init__(self, limit: int):
        self._entries: dict = {}
        self._limit = limit
        self.get = self._entries.get
        _memos.add(self)

    def put(self, key, value):
        """Remember `value` under `key`; returns it."""
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = value
        return value

    def clear(self) -> None:
        self._entries.clear()


def clear_memos() -> None:
    """Forget every remembered validation verdict, kernel choice, launch argument block, tensor map
    and launch configuration in this process. Loaded kernels and the disk cache stay. For tests and
    for code that changes what the memos were derived from (e.g. the heuristics' tables)."""
    for memo in list(_memos):
        memo.clear()
