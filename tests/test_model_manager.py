"""The model manager: one load per key under threads, LRU eviction by size, groups that keep N."""
from __future__ import annotations

import threading
import time

import torch

from pipelines.model_manager import ModelManager, model_bytes


def _net(n: int) -> torch.nn.Module:
    return torch.nn.Linear(n, n, bias=False)          # n*n*4 bytes


def test_size_is_measured_from_tensors():
    assert model_bytes(_net(10)) == 400
    class Holder:
        def __init__(self):
            self.unet = _net(10)
            self.other = self.unet                     # shared module counted once
    assert model_bytes(Holder()) == 400 and model_bytes(object()) == 0


def test_one_load_per_key_under_threads():
    mm = ModelManager(max_bytes=10**9)
    calls = []

    def loader():
        calls.append(1)
        time.sleep(0.05)
        return _net(4)
    out = []
    threads = [threading.Thread(target=lambda: out.append(mm.get("a", loader))) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and len({id(o) for o in out}) == 1


def test_lru_eviction_by_size_and_group_limit():
    mm = ModelManager(max_bytes=1000)                 # room for two 400-byte models
    mm.get("a", lambda: _net(10))
    mm.get("b", lambda: _net(10))
    mm.get("a", lambda: _net(10))                     # a is now the most recently used
    mm.get("c", lambda: _net(10))                     # over the limit: b (LRU) goes
    assert "a" in mm and "c" in mm and "b" not in mm and mm.total_bytes <= 1000
    mm.get("p1", lambda: _net(2), group="pix", group_limit=1)
    mm.get("p2", lambda: _net(2), group="pix", group_limit=1)    # a retrained model replaces it
    assert "p2" in mm and "p1" not in mm
    big = mm.get("huge", lambda: _net(40))            # larger than the limit alone: still served
    assert "huge" in mm and big.weight.shape == (40, 40) and mm.stats()["entries"] == 1
