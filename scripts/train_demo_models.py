"""Train the small pixel-inpaint models shipped with the demo products (``assets/models``).

    python scripts/train_demo_models.py [--products bottle,brushed_metal] [--steps 1600]
                                        [--threads 1] [--data assets/demo] [--out assets/models]

One model per demo product (``assets/demo/<product>``, made by :mod:`pipelines.demo_data`), so a
fresh install has a diffusion backend without any set-up. What each model learns from:

* the product's *reference* real defects only (:func:`pipelines.roles.category_roles`: the
  evaluation defects are never read), listed by pixel hash in ``training_data.json`` — every
  sample the model makes carries these hashes as its ancestors, so the experiment's leakage check
  (:func:`pipelines.roles.check_descent`) works with its samples;
* the product's ``train/good`` images (no data role: nothing is copied from them).

Schedule (:class:`pipelines.pixel_inpaint.PixelInpaintConfig`, two-stage): the first half of the
steps learns the product (good images with masks shaped like each damage type, class "normal"),
the second half the damage types (the reference defects + 25 % good examples). Preset ``demo``
(~1.8 M parameters), 64 px crops, batch 8. The weights are stored as float16 safetensors
(3.4 MiB; the model loads them into float32); the script refuses a file over 5 MB.

Reproducible: fixed seeds, a step budget (never a wall-clock one), deterministic torch
algorithms, a fixed number of CPU threads (``--threads``; results can differ between thread
counts and torch builds, not between runs: two runs give byte-identical ``model.safetensors``,
``config.json`` and ``training_data.json``). CPU budget: the default 1600 steps take about 9–10
CPU-minutes per product (measured 573 s and 537 s on one thread, ~0.35 s per step with data
loading and the mask-shape fits); on a machine shared with other jobs the wall clock is longer
(figures in ``training_log.json``). The earlier 240-step models filled masks with coloured noise;
at 1600 steps cracks and scratches come out as thin dark marks and stains as brownish blots
(``preview.png``), and on the demo bottle a segmenter trained on their samples alone reaches a
pixel AP of 0.546 (240 steps: 0.396; reference defects: 0.774). Ctrl-C stops and leaves the shipped
folder as it was.

Written per product into ``OUT/<product>/pixel-inpaint/``: ``model.safetensors``,
``config.json`` (format, damage types, U-Net config, schedule), ``training_data.json`` (the
reference images by path and pixel hash), ``training_log.json`` (steps, loss curve, seconds,
versions) and ``preview.png`` (per damage type: a good image with a shaped mask, then the
generated defect at seeds 0–2).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BYTES = 5_000_000
DEFAULT_PRODUCTS = ("bottle", "brushed_metal")
DEFAULT_STEPS = 1600


def deterministic(threads: int) -> None:
    """One fixed CPU setting for every run: the thread count and torch's deterministic kernels."""
    import torch
    torch.set_num_threads(max(1, int(threads)))
    torch.use_deterministic_algorithms(True)


def config_for(data: Path, out: Path, steps: int, seed: int = 0):
    from pipelines.pixel_inpaint_model import PixelInpaintConfig
    return PixelInpaintConfig(
        output_dir=str(out), data=str(data), preset="demo", resolution=64, batch_size=8,
        max_steps=int(steps), minutes=None, pretrain_steps=max(1, int(steps) // 2),
        pretrain_masks="shapes", seed=seed, resume=False, checkpoint_every=10**9,
        checkpoint_limit=1, validate_every=0, log_every=max(1, min(50, int(steps) // 4)))


def shipped_manifest(data: Path, run: Path) -> dict:
    """The run's ``training_data.json`` with the data folder relative to the repository (it
    names the same images on every machine)."""
    from pipelines.training_data import read_manifest
    man = read_manifest(run)
    try:
        rel = Path(man["data"]).resolve().relative_to(ROOT)
    except ValueError:
        rel = Path(man["data"])
    from pipelines.roles import file_pixel_hash
    hashes = {r: file_pixel_hash(Path(man["data"]) / r) for r in man.get("reference", [])}
    return {**man, "data": rel.as_posix(), "reference_hashes": hashes,
            "trained_by": "scripts/train_demo_models.py"}


def preview(model_dir: Path, data: Path, dest: Path, seeds=(0, 1, 2)) -> Path:
    """One row per damage type: a good image crop with a shaped mask (red), then generated defects."""
    import cv2
    import numpy as np

    from pipelines import masks as mk
    from pipelines.fileio import atomic_write_bytes
    from pipelines.mvtec import load_category, load_image, load_mask
    from pipelines.pixel_inpaint_model import PixelInpaintModel, crop_box
    from pipelines.roles import category_roles
    from pipelines.shapes import estimate_foreground, shape_model_for
    model = PixelInpaintModel.load(model_dir)
    cat = load_category(data)
    roles = category_roles(cat)
    goods = [load_image(p, None) for p in cat.train[:10]]
    good, fg = goods[0], estimate_foreground(goods)
    fg = None if fg.all() or not fg.any() else fg
    rows = []
    for i, t in enumerate(model.types):
        masks = [load_mask(s, None) for s in roles.reference if s.label == t]
        shape = shape_model_for(t, masks, None if fg is None else [fg] * len(masks))
        where = fg if getattr(shape, "on_product", True) else None
        m = shape.sample(good.shape[:2], np.random.default_rng(i), where)
        x0, y0, x1, y1 = crop_box(mk.dilate(m, 4), model.context, model.min_crop)
        shown = good.copy()
        shown[m > 0] = (0.5 * shown[m > 0] + [127, 0, 0]).astype(np.uint8)
        cells = [shown] + [model.inpaint(good, m, t, seed=s) for s in seeds]
        rows.append(np.concatenate([cv2.resize(c[y0:y1, x0:x1], (96, 96), interpolation=cv2.INTER_AREA)
                                    for c in cells], 1))
    grid = np.concatenate(rows, 0)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return atomic_write_bytes(dest, buf.tobytes())


def train_product(product: str, data_root: Path, out_root: Path, steps: int, threads: int,
                  quiet: bool = False, keep_run: Path | None = None, with_preview: bool = True) -> dict:
    """Train one product's model and write ``out_root/<product>/pixel-inpaint``; returns its log."""
    import torch

    from pipelines.pixel_inpaint import SHIPPED_NAME
    from pipelines.pixel_inpaint_model import export_model, run_from_config
    from pipelines.training_data import MANIFEST
    from pipelines.fileio import atomic_write_json
    data = data_root / product
    if not (data / "train" / "good").is_dir():
        raise SystemExit(f"error: {data} is not a demo product folder (train/good missing); "
                         "regenerate it with `python -m studio demo-data --out assets/demo`")
    dest = out_root / product / SHIPPED_NAME
    with tempfile.TemporaryDirectory(prefix=f"demo-model-{product}-") as tmp:
        run = keep_run / product if keep_run else Path(tmp) / "run"
        cfg = config_for(data, run, steps)
        t0, c0 = time.perf_counter(), time.process_time()

        def progress(frac, msg):
            if not quiet:
                print(f"\r{product}: {frac:6.1%} {msg:<60}", end="", file=sys.stderr, flush=True)

        result = run_from_config(cfg, progress=progress)
        if not quiet:
            print(file=sys.stderr)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        staged = Path(tmp) / "export"            # complete before it replaces the shipped folder
        export_model(result.checkpoint, staged, dtype="float16")
        atomic_write_json(staged / MANIFEST, shipped_manifest(data, run), indent=1)
        size = (staged / "model.safetensors").stat().st_size
        if size > MAX_BYTES:
            raise SystemExit(f"error: the model for {product} is {size / 1e6:.2f} MB, over the "
                             f"{MAX_BYTES / 1e6:g} MB limit; choose a smaller preset")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, dest)
    import diffusers
    log = {"product": product, "steps": result.step, "stopped": result.stopped,
           "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(),
           "final_loss": round(float(result.loss), 5), "losses": [[s, round(v, 5)] for s, v in result.losses],
           "model_bytes": size, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "config": {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "data")}}
    atomic_write_json(dest / "training_log.json", log, indent=1, default=str)
    if with_preview:
        preview(dest, data, dest / "preview.png")
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", default=",".join(DEFAULT_PRODUCTS),
                    help="comma-separated demo products (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="optimisation steps per product, half of them learning the product (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1; the same count reproduces the same weights)")
    ap.add_argument("--data", default=str(ROOT / "assets" / "demo"), help="demo products folder (default %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "assets" / "models"), help="output root (default %(default)s)")
    ap.add_argument("--keep-run", help="keep the training runs (checkpoints, history) in this folder")
    ap.add_argument("--no-preview", action="store_true", help="skip preview.png")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("error: --steps must be ≥ 2 (one step per stage at least)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    deterministic(args.threads)
    logs = []
    try:
        for product in [p.strip() for p in args.products.split(",") if p.strip()]:
            logs.append(train_product(product, Path(args.data), Path(args.out), args.steps, args.threads,
                                      args.quiet, Path(args.keep_run) if args.keep_run else None,
                                      not args.no_preview))
    except KeyboardInterrupt:
        print("\ncancelled: nothing written for the product in progress", file=sys.stderr)
        return 130
    except ValueError as exc:          # TrainDataError, LeakageError, ModelError …
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([{k: v for k, v in log.items() if k not in ("losses", "config")} for log in logs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
