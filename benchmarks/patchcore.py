"""PatchCore speed / memory / quality on the demo data, side by side with anomalib's PatchCore.

    python benchmarks/patchcore.py [--data assets/demo] [--products bottle,brushed_metal]
                                   [--backbone efficientnet_lite0] [--coreset 0.1] [--repeats 3]

Per product it prints, for ours: fit seconds, ms per image, bare-backbone ms per image and the
ratio of total inference time to that backbone forward (target ≤ 1.3), peak RSS, the k-NN time
of faiss (IndexFlatL2) vs our torch addmm search vs torch.cdist on the real bank and test
patches, and all metrics; then the same for anomalib 2.7.0's ``PatchcoreModel`` with the same
EfficientNet-Lite weights loaded (strictly) into its timm extractor, on the same images.

Each model runs in its own fresh subprocess (so peak RSS is per run). Fit time is the minimum
over ``--repeats`` fits; inference and bare-backbone times are, per batch of 8 images, the
minimum over ``--repeats`` interleaved runs, summed (the machine may be shared: the minimum is the
least disturbed run). Both use the same torch thread count. Anomalib's inference time is its
``PatchcoreModel.forward`` on normalised tensors; ours is ``PatchCore.predict`` on uint8 images
(it includes conversion and the numpy maps). anomalib lives in a separate venv, never in the project's
requirements: set ANOMALIB_PYTHON (default /opt/anomalib-venv/bin/python) to its interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ANOMALIB_PYTHON = os.environ.get("ANOMALIB_PYTHON", "/opt/anomalib-venv/bin/python")
HOW_TO_ANOMALIB = ("python -m venv /opt/anomalib-venv && /opt/anomalib-venv/bin/pip install "
                   "torch==2.14.1 torchvision==0.29.1 && /opt/anomalib-venv/bin/pip install anomalib==2.7.0; "
                   "or set ANOMALIB_PYTHON to an interpreter that has anomalib 2.7.0")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(data: Path, size: int):
    import numpy as np
    from pipelines.mvtec import load_category, load_image, load_mask
    cat = load_category(data)
    train = [load_image(p, size) for p in cat.train]
    test = [load_image(s.path, size) for s in cat.test]
    masks = np.stack([load_mask(s, size) for s in cat.test])
    labels = np.array([s.is_anomaly for s in cat.test], int)
    return train, test, masks, labels


def _metrics(labels, scores, masks, maps) -> dict:
    from pipelines import metrics as MET
    res = MET.evaluate(labels, scores, masks, maps)
    return {k: float(res[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")}


# ------------------------------------------------------------------------------------------------
# workers (each runs in a fresh process and prints one JSON line)


def _plain_timm_features(backbone: str, layers):
    """timm's stock ``features_only`` model with the same weights: all stages, BatchNorm kept."""
    import timm
    from pipelines import backbones as B
    if not backbone.startswith("efficientnet_lite"):
        return None
    sd, _ = B._lite_state_dict(backbone, None)
    m = timm.create_model(f"tf_{backbone}", pretrained=False, features_only=True, out_indices=tuple(layers))
    m.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))})
    return m.eval()


def worker_ours(args) -> dict:
    import numpy as np
    import torch
    from pipelines.patchcore import NearestNeighbours, PatchCore, cdist_knn

    train, test, masks, labels = _load(Path(args.data), args.size)
    fits = []
    for _ in range(args.fit_repeats):
        model = PatchCore(backbone=args.backbone, coreset=args.coreset, size=args.size, dim=args.dim,
                          knn=args.knn, seed=0)
        t0 = time.perf_counter()
        model.fit(train)
        fits.append(time.perf_counter() - t0)
    scores, maps = model.predict(test)
    plain = _plain_timm_features(args.backbone, model.extractor.layers)
    # per batch of 8: min over repeats of the whole predict(), of the bare backbone forward
    # (ours: truncated, BatchNorm folded) and of timm's plain features_only forward (untruncated,
    # unfolded, as anomalib runs it), interleaved (robust to bursts of load), summed over batches
    infer_s = backbone_s = plain_s = 0.0
    for b in range(0, len(test), 8):
        batch = test[b:b + 8]
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
        xn = (x - model.extractor.mean) / model.extractor.std
        ti, tb, tp = [], [], []
        with torch.inference_mode():
            model.extractor(x)
            if plain is not None:
                plain(xn)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model.predict(batch)
                ti.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.extractor(x)
                tb.append(time.perf_counter() - t0)
                if plain is not None:
                    t0 = time.perf_counter()
                    plain(xn)
                    tp.append(time.perf_counter() - t0)
        infer_s += min(ti)
        backbone_s += min(tb)
        plain_s += min(tp) if tp else float("nan")
    infers, backbones = [infer_s], [backbone_s]
    out = {"fit_s": min(fits), "ms_per_image": 1000 * min(infers) / len(test),
           "backbone_ms_per_image": 1000 * min(backbones) / len(test),
           "bank": [model.bank_size, model.dim_out], "metrics": _metrics(labels, scores, masks, maps)}
    out["ratio_to_backbone"] = out["ms_per_image"] / out["backbone_ms_per_image"]
    out["plain_timm_ms_per_image"] = 1000 * plain_s / len(test)
    out["ratio_to_plain_timm"] = out["ms_per_image"] / out["plain_timm_ms_per_image"]
    # k-NN backends on the real bank and all test patches
    emb = model.embed(test).reshape(-1, model.dim_out)
    knn = {}
    ref = None
    for name, search in (
            ("faiss_flat", NearestNeighbours(model.memory_bank, "faiss").search),
            ("torch_ours", NearestNeighbours(model.memory_bank, "torch").search),
            ("torch_cdist", lambda q, k: cdist_knn(q, model.memory_bank, k))):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            d, i = search(emb, 1)
            times.append(time.perf_counter() - t0)
        ref = i if ref is None else ref
        knn[name] = {"s": min(times), "top1_agree": float((i == ref).float().mean())}
    out["knn"] = {"queries": len(emb), **knn}
    out["peak_rss_mb"] = _peak_rss_mb()
    out["threads"] = torch.get_num_threads()
    return out


def worker_anomalib(args) -> dict:
    import numpy as np
    import torch
    import anomalib
    import timm
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from pipelines.backbones import IMAGENET_MEAN, IMAGENET_STD, lite_weights_path, rename_lite_keys

    if not args.backbone.startswith("efficientnet_lite"):
        raise SystemExit("the anomalib comparison loads the offline EfficientNet-Lite weights only")
    train, test, masks, labels = _load(Path(args.data), args.size)
    # the very file our backbone loads (passed in: the anomalib venv need not have the package)
    raw = torch.load(args.weights or lite_weights_path(args.backbone), map_location="cpu", weights_only=True)
    depths = [len(s) for s in timm.create_model(f"tf_{args.backbone}", pretrained=False).blocks]
    sd = {k: v for k, v in rename_lite_keys(raw, depths).items()
          if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def batches(imgs):
        for s in range(0, len(imgs), 8):
            x = torch.from_numpy(np.stack(imgs[s:s + 8])).permute(0, 3, 1, 2).float() / 255
            yield (x - mean) / std

    def build():
        m = PatchcoreModel(layers=[2, 3], backbone=f"tf_{args.backbone}", pre_trained=False, num_neighbors=9)
        m.feature_extractor.feature_extractor.load_state_dict(sd, strict=True)
        return m

    fits = []
    for _ in range(args.fit_repeats):
        model = build()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model.train()
        with torch.inference_mode():
            for x in batches(train):
                model(x)
        model.subsample_embedding(args.coreset)
        fits.append(time.perf_counter() - t0)
    model.eval()
    xs = list(batches(test))
    infer_s = backbone_s = 0.0
    with torch.inference_mode():
        outs = [model(x) for x in xs]
        for x in xs:                     # per batch: min over repeats, interleaved (as for ours)
            ti, tb = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(x)
                ti.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.feature_extractor(x)
                tb.append(time.perf_counter() - t0)
            infer_s += min(ti)
            backbone_s += min(tb)
    infers, backbones = [infer_s], [backbone_s]
    scores = torch.cat([o.pred_score.reshape(-1) for o in outs]).numpy()
    maps = torch.cat([o.anomaly_map.reshape(len(o.pred_score), *o.anomaly_map.shape[-2:]) for o in outs]).numpy()
    out = {"fit_s": min(fits), "ms_per_image": 1000 * min(infers) / len(test),
           "backbone_ms_per_image": 1000 * min(backbones) / len(test),
           "bank": list(model.memory_bank.shape), "metrics": _metrics(labels, scores, masks, maps),
           "anomalib": anomalib.__version__, "peak_rss_mb": _peak_rss_mb(),
           "threads": torch.get_num_threads()}
    out["ratio_to_backbone"] = out["ms_per_image"] / out["backbone_ms_per_image"]
    return out


# ------------------------------------------------------------------------------------------------
# driver


# anomalib's KCenterGreedy allocates an [N x k] temporary (31 MB here) per iteration while
# appending small tensors to a list; with glibc's default (dynamic) mmap threshold the heap
# fragments and RSS grows by ~31 MB per iteration (it was OOM-killed at 22 GB on this machine).
# A fixed mmap threshold returns those blocks to the OS; it is set for anomalib's process only.
ANOMALIB_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def _run_worker(python: str, which: str, args, data: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", which, "--data", str(data),
           "--backbone", args.backbone, "--coreset", str(args.coreset), "--size", str(args.size),
           "--repeats", str(args.repeats), "--fit-repeats", str(args.fit_repeats), "--knn", args.knn, "--dim", str(args.dim)]
    if which == "anomalib":
        from pipelines.backbones import lite_weights_path
        cmd += ["--weights", str(lite_weights_path(args.backbone))]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if which == "anomalib":
        env.update(ANOMALIB_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{which} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in m.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "assets" / "demo"))
    ap.add_argument("--products", default="bottle,brushed_metal")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--coreset", type=float, default=0.1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dim", default="default", help="embedding dim (int, 'none' = native channels)")
    ap.add_argument("--knn", default="default", help="faiss | torch")
    ap.add_argument("--repeats", type=int, default=5, help="inference repeats (min taken)")
    ap.add_argument("--fit-repeats", type=int, default=2, help="fit repeats (min taken)")
    ap.add_argument("--no-anomalib", action="store_true")
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["ours", "anomalib"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        import inspect
        if args.worker == "ours":
            from pipelines.patchcore import PatchCore
            defaults = inspect.signature(PatchCore).parameters
            args.dim = defaults["dim"].default if args.dim == "default" else (
                None if args.dim.lower() == "none" else int(args.dim))
            args.knn = defaults["knn"].default if args.knn == "default" else args.knn
        res = worker_ours(args) if args.worker == "ours" else worker_anomalib(args)
        print(json.dumps(res))
        return 0

    have_anomalib = not args.no_anomalib and Path(ANOMALIB_PYTHON).exists() and subprocess.run(
        [ANOMALIB_PYTHON, "-c", "import anomalib"], capture_output=True).returncode == 0
    print(f"# PatchCore benchmark: backbone={args.backbone} size={args.size} coreset={args.coreset} "
          f"dim={args.dim} knn={args.knn} repeats={args.repeats}/{args.fit_repeats} (min over repeats), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for product in args.products.split(","):
        data = Path(args.data) / product
        print(f"\n## {product}")
        ours = _run_worker(sys.executable, "ours", args, data)
        print(f"ours     : fit {ours['fit_s']:.2f} s | {ours['ms_per_image']:.1f} ms/image | backbone "
              f"{ours['backbone_ms_per_image']:.1f} ms/image | ratio {ours['ratio_to_backbone']:.2f} "
              f"(target <= 1.3; {ours['ratio_to_plain_timm']:.2f} vs timm's plain features_only forward, "
              f"{ours['plain_timm_ms_per_image']:.1f} ms/image) | peak RSS {ours['peak_rss_mb']:.0f} MB | bank {ours['bank'][0]} x {ours['bank'][1]}")
        print(f"           {_fmt_metrics(ours['metrics'])}")
        k = ours["knn"]
        print(f"  kNN {k['queries']} queries: faiss IndexFlatL2 {1000 * k['faiss_flat']['s']:.0f} ms | ours (torch "
              f"matmul+max) {1000 * k['torch_ours']['s']:.0f} ms (top-1 agree {k['torch_ours']['top1_agree']:.4f}) | "
              f"torch.cdist {1000 * k['torch_cdist']['s']:.0f} ms (agree {k['torch_cdist']['top1_agree']:.4f})")
        if args.no_anomalib:
            print("anomalib : skipped (--no-anomalib)")
            continue
        if not have_anomalib:
            print(f"anomalib : not installed ({HOW_TO_ANOMALIB})")
            continue
        try:
            an = _run_worker(ANOMALIB_PYTHON, "anomalib", args, data)
        except RuntimeError as exc:
            print(f"anomalib : failed — {exc}")
            continue
        print(f"anomalib : fit {an['fit_s']:.2f} s | {an['ms_per_image']:.1f} ms/image | backbone "
              f"{an['backbone_ms_per_image']:.1f} ms/image | ratio {an['ratio_to_backbone']:.2f} | "
              f"peak RSS {an['peak_rss_mb']:.0f} MB | bank {an['bank'][0]} x {an['bank'][1]} (anomalib {an['anomalib']})")
        print(f"           {_fmt_metrics(an['metrics'])}")
        print(f"           (anomalib PatchcoreModel, same images/normalisation/weights, run with "
              f"{' '.join(f'{k}={v}' for k, v in ANOMALIB_ENV.items())}: see ANOMALIB_ENV)")
        print(f"  speed-up: fit {an['fit_s'] / ours['fit_s']:.1f}x (aim >= 5x), inference "
              f"{an['ms_per_image'] / ours['ms_per_image']:.2f}x (aim >= 1.8x); "
              + ", ".join(f"{m} {ours['metrics'][m] - an['metrics'][m]:+.4f}"
                          for m in ("image_auroc", "pixel_auroc", "aupro")) + " (ours - anomalib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
