"""PatchCore ablation: one knob at a time, on MVTec-AD-layout category folders.

    python benchmarks/patchcore_ablation.py [CATEGORY_DIR ...] [--no-demo] [--rows 1,2,...] [--threads N]
    python benchmarks/patchcore_ablation.py --features [CATEGORY_DIR]

Every row is a :class:`pipelines.patchcore.PatchCore` configuration (the CLI's settings —
``PatchCore`` defaults with ``--coreset 0.1`` — plus the row's changes) fitted on ``train/good`` and evaluated on ``test/`` of each folder; it prints
image AUROC / pixel AUROC / AUPRO per folder and the fit seconds of the first one. The demo
products (``assets/demo/bottle``, ``assets/demo/brushed_metal``) are always included unless
``--no-demo``. Rows come in two groups: the earlier defaults with one fix added at a time
(``old + …``), and the current defaults with one thing taken back at a time (``now − …``).

A separate check (``--features``) compares our extractor (truncated, BatchNorm folded, renamed
keys) with timm's stock ``tf_efficientnet_lite0`` features_only forward on the same weights.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = [ROOT / "assets" / "demo" / "bottle", ROOT / "assets" / "demo" / "brushed_metal"]
CLI = {"coreset": 0.1}                  # what `python -m studio patchcore` passes by default
# the defaults before issue 11 (80 pooled channels, border cells averaged over in-image cells
# only, ImageNet normalisation, the paper's reweighted image score)
OLD = dict(dim=80, count_include_pad=False, normalization="imagenet", image_score="reweight")
ROWS: dict[str, dict] = {
    "old defaults": OLD,
    "old + zero-padded 3x3 mean (count_include_pad)": {**OLD, "count_include_pad": True},
    "old + all 152 channels": {**OLD, "dim": None},
    "old + normalisation tf (0.5/0.5)": {**OLD, "normalization": "tf"},
    "old + image score = max of smoothed map": {**OLD, "image_score": "max"},
    "old + coreset 100 %": {**OLD, "coreset": 1.0},
    "old + zero padding + 152 channels": {**OLD, "count_include_pad": True, "dim": None},
    "now (defaults)": {},
    "now - count_include_pad (in-image cells only)": {"count_include_pad": False},
    "now - all channels (80 pooled)": {"dim": 80},
    "now - tf normalisation (imagenet)": {"normalization": "imagenet"},
    "now + image score = max of smoothed map": {"image_score": "max"},
    "now + coreset 5 %": {"coreset": 0.05},
    "now + coreset 25 %": {"coreset": 0.25},
    "now + sigma 2": {"sigma": 2.0},
}


def _load(folder: Path, size: int = 256):
    import numpy as np
    from pipelines.mvtec import load_category, load_image, load_mask
    cat = load_category(folder)
    train = [load_image(p, size) for p in cat.train]
    test = [load_image(s.path, size) for s in cat.test]
    masks = np.stack([load_mask(s, size) for s in cat.test])
    labels = np.array([s.is_anomaly for s in cat.test], int)
    return train, test, masks, labels


def evaluate(config: dict, data) -> dict:
    """Fit on train, score test: metrics + fit seconds."""
    from pipelines import metrics as MET
    from pipelines.patchcore import PatchCore
    train, test, masks, labels = data
    model = PatchCore(**{**CLI, **config})
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    scores, maps = model.predict(test)
    res = MET.evaluate(labels, scores, masks, maps)
    return {"image_auroc": res["image_auroc"], "pixel_auroc": res["pixel_auroc"], "aupro": res["aupro"],
            "fit_s": fit_s}


def compare_features(image_dir: Path | None = None) -> None:
    """Our extractor vs timm's stock features_only model with the same (renamed) state dict."""
    import numpy as np
    import timm
    import torch
    from pipelines import backbones as B

    if image_dir is not None:
        from pipelines.mvtec import load_category, load_image
        imgs = np.stack([load_image(p, 256) for p in load_category(image_dir, require_test=False).train[:8]])
    else:
        from skimage import data
        import cv2
        imgs = np.stack([cv2.resize(data.chelsea(), (256, 256)), cv2.resize(data.coffee(), (256, 256))])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    sd, _ = B._lite_state_dict("efficientnet_lite0", None)
    stock = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    stock.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))},
                          strict=True)
    stock.eval()
    for norm in B.NORMALIZATIONS:
        fused = B.build_backbone("efficientnet_lite0", normalization=norm)
        plain = B.build_backbone("efficientnet_lite0", normalization=norm, fuse=False)
        with torch.inference_mode():
            ref = stock((x - fused.mean) / fused.std)
            a, b = fused(x), plain(x)
        for i, r in enumerate(ref):
            print(f"features {norm:8s} stage {fused.layers[i]} {tuple(r.shape[1:])}: max |fused - stock| "
                  f"{float((a[i] - r).abs().max()):.2e}, max |unfused - stock| {float((b[i] - r).abs().max()):.2e} "
                  f"(max |stock| {float(r.abs().max()):.1f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, help="MVTec-AD-layout category folders")
    ap.add_argument("--no-demo", action="store_true", help="leave out the demo products")
    ap.add_argument("--rows", default="", help="comma-separated row numbers (1-based) to run; default all")
    ap.add_argument("--features", action="store_true", help="compare our extractor with timm's stock forward")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 keeps a shared machine's fit times sane)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.features:
        compare_features(args.folders[0] if args.folders else None)
        return 0
    folders = list(args.folders) + ([] if args.no_demo else DEMO)
    if not folders:
        raise SystemExit("no category folders given")
    data = {f: _load(f) for f in folders}
    names = list(ROWS)
    if args.rows:
        names = [names[int(i) - 1] for i in args.rows.split(",")]
    head = " | ".join(f"{f.name} img / pix / AUPRO" for f in folders)
    print(f"| knob | {head} | fit s ({folders[0].name}) |")
    print("|---|" + "---|" * (len(folders) + 1))
    for name in names:
        cells, fit_s = [], None
        for f in folders:
            r = evaluate(ROWS[name], data[f])
            fit_s = r["fit_s"] if fit_s is None else fit_s
            cells.append(f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['aupro']:.3f}")
        print(f"| {name} | {' | '.join(cells)} | {fit_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
