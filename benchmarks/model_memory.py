"""RSS of one studio process over N retrain + generate cycles of pixel-inpaint.

    python benchmarks/model_memory.py [--cycles 5] [--data assets/demo/bottle] [--json]

Each cycle trains a new pixel-inpaint model in a separate process (as the Training tab does) and
then generates candidates with it in THIS process through ``studio.services.generate`` (as the
Annotate tab does). Prints the RSS after each cycle, the loaded model's size and the growth from
the end of the warm-up cycles to the end of the last one; the model manager keeps one pixel-inpaint model loaded, so the
growth should stay below one model's size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


TRAIN = """
import sys
from pipelines import pixel_inpaint as P
data, tmp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    P.run_from_config(P.PixelInpaintConfig(output_dir=f"{tmp}/run{i}", data=data, image_size=128, batch_size=2,
                                           max_steps=1, minutes=None, validate_every=0, seed=i))
"""


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="cycles run first and not counted")
    ap.add_argument("--data", default=str(ROOT / "assets" / "demo" / "bottle"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from pipelines.mvtec import load_image
    from pipelines.model_manager import MANAGER, model_bytes
    from studio.services import GenerateRequest, generate
    img = load_image(Path(a.data) / "train" / "good" / "000.png", 128)
    mask = np.zeros((128, 128), np.uint8)
    mask[40:70, 50:80] = 255
    rows = []
    n = a.warmup + a.cycles
    with tempfile.TemporaryDirectory() as tmp:
        # the retrains run in one other process (the Training tab trains out of the app process too)
        subprocess.run([sys.executable, "-c", TRAIN, a.data, tmp, str(n)], check=True, cwd=ROOT, capture_output=True)
        for i in range(n):                       # the first cycles warm up (first models, first generates)
            out = Path(tmp) / f"run{i}"
            cands = generate(GenerateRequest(image=img, mask=mask, damage_type="contamination",
                                             backend="pixel-inpaint", n=2, seed=i,
                                             options={"model": str(out), "steps": 3}))
            assert len(cands) == 2
            loaded = [e.value for e in MANAGER._entries.values() if e.group == "pixel-inpaint"]
            rows.append({"cycle": i, "rss_mb": round(rss_mb(), 1), "loaded_pixel_inpaint": len(loaded),
                         "model_mb": round(model_bytes(loaded[0].unet) / 2**20, 1) if loaded else 0.0})
    base = rows[a.warmup - 1]["rss_mb"] if a.warmup else rows[0]["rss_mb"]
    res = {"cycles": rows, "growth_mb": round(rows[-1]["rss_mb"] - base, 1),  # over the counted cycles
           "model_mb": rows[0]["model_mb"]}
    print(json.dumps(res) if a.json else "\n".join(
        [f"cycle {r['cycle']}: RSS {r['rss_mb']} MB, pixel-inpaint models loaded {r['loaded_pixel_inpaint']}"
         for r in rows] + [f"growth {res['growth_mb']} MB over {a.cycles} cycles; one model = {res['model_mb']} MB"]))
    return res


if __name__ == "__main__":
    main()
