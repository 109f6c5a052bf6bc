"""One owner of loaded models: thread-safe, size-limited, least-recently-used eviction.

Every model cache in the studio goes through :data:`MANAGER` (diffusers pipelines in
:mod:`pipelines.models`, pixel-inpaint models, DDPM checkpoints, …)::

    model = MANAGER.get(key, loader, group="pixel-inpaint", group_limit=1)

* ``key`` identifies one loaded object (e.g. folder + file mtime); ``loader()`` builds it on a miss.
  Concurrent callers of one key wait for a single load (a per-key lock), other keys load in parallel.
* ``group`` + ``group_limit``: at most that many entries of a group stay loaded — a retrained
  model (new mtime → new key) replaces the previous one instead of piling up.
* ``max_bytes``: when the sum of the entries' sizes passes it, the least recently used entries are
  dropped (the one just loaded always stays). Sizes are measured from torch parameters and
  buffers (an ``nn.Module``, a diffusers pipeline's components, or modules held as attributes).

The limit comes from ``$DEFECT_STUDIO_MODEL_CACHE_MB`` (default 6144 MB).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

DEFAULT_MB = 6144


def release_memory() -> None:
    """Give freed memory back to the OS after an eviction: ``gc.collect()`` and, on glibc,
    ``malloc_trim(0)`` (freed tensor blocks otherwise stay in the heap and RSS never drops)."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc (macOS, Windows, musl): nothing to trim
        pass


def model_bytes(obj: Any) -> int:
    """Bytes of the torch tensors an object holds (parameters + buffers, each tensor once)."""
    try:
        import torch.nn as nn
    except ImportError:          # pragma: no cover - torch is a dependency
        return 0
    modules: list = []
    if isinstance(obj, nn.Module):
        modules.append(obj)
    else:
        comps = getattr(obj, "components", None)
        values = list(comps.values()) if isinstance(comps, dict) else []
        values += list(getattr(obj, "__dict__", {}).values())
        modules += [v for v in values if isinstance(v, nn.Module)]
    seen, total = set(), 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@dataclass
class _Entry:
    value: Any
    nbytes: int
    group: str | None


class ModelManager:
    def __init__(self, max_bytes: int | None = None):
        mb = float(os.environ.get("DEFECT_STUDIO_MODEL_CACHE_MB", DEFAULT_MB))
        self.max_bytes = int(max_bytes if max_bytes is not None else mb * 2**20)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}
        self.loads = 0
        self.evictions = 0

    def get(self, key: Hashable, loader: Callable[[], Any], *, group: str | None = None,
            group_limit: int | None = None) -> Any:
        """The object for ``key``, loaded with ``loader()`` on a miss (once, even under threads)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit.value
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    self._entries.move_to_end(key)
                    return hit.value
            if group is not None and group_limit is not None:
                with self._lock:                   # make room first: the old model is freed
                    n = self._evict_group(key, group, group_limit)   # before the new one is allocated
                if n:
                    release_memory()
            value = loader()                       # outside the manager's lock: others go on
            entry = _Entry(value, model_bytes(value), group)
            with self._lock:
                self._entries[key] = entry
                self.loads += 1
                self._loading.pop(key, None)
                self._evict(key, group, group_limit)
            return value

    def _evict_group(self, keep: Hashable, group: str, group_limit: int) -> int:
        same = [k for k, e in self._entries.items() if e.group == group and k != keep]
        drop = same[: max(0, len(same) - (group_limit - 1))]
        for k in drop:
            del self._entries[k]
            self.evictions += 1
        return len(drop)

    def _evict(self, keep: Hashable, group: str | None, group_limit: int | None) -> None:
        if group is not None and group_limit is not None:
            self._evict_group(keep, group, group_limit)
        while self.total_bytes > self.max_bytes and len(self._entries) > 1:
            oldest = next(k for k in self._entries if k != keep)
            del self._entries[oldest]
            self.evictions += 1

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def evict(self, key: Hashable) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def clear(self, group: str | None = None) -> None:
        with self._lock:
            for k in [k for k, e in self._entries.items() if group is None or e.group == group]:
                del self._entries[k]

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.total_bytes, "max_bytes": self.max_bytes,
                    "loads": self.loads, "evictions": self.evictions,
                    "groups": sorted({str(e.group) for e in self._entries.values()})}

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries


MANAGER = ModelManager()

__all__ = ["ModelManager", "MANAGER", "model_bytes", "release_memory"]
