"""Five retrain + generate cycles of pixel-inpaint in one process grow RSS by less than one model
(the model manager keeps one pixel-inpaint model loaded; before it, every retrain stayed in memory)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_retrain_generate_cycles_do_not_pile_up_models():
    proc = subprocess.run([sys.executable, "benchmarks/model_memory.py", "--cycles", "5", "--warmup", "2", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["loaded_pixel_inpaint"] == 1 for r in res["cycles"])
    assert res["growth_mb"] < res["model_mb"], res
