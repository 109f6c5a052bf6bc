"""PatchCore speed / memory / quality on the demo data and real category folders, vs anomalib.

    python benchmarks/patchcore.py [CATEGORY_DIR ...] [--data assets/demo]
        [--products bottle,brushed_metal] [--backbone efficientnet_lite0] [--coreset F]
        [--dim N|none] [--knn auto|faiss|torch] [--repeats 7] [--fit-repeats 2] [--no-anomalib]
        [--threads N] [--clock wall|cpu] [--variants default,orient=none,...] [--rotate SEED,...]

``--variants``: comma-separated PatchCore settings, each ``default`` or ``key=value[+key=value]``
over the defaults (e.g. ``orient=none``, ``orient=canonical``, ``orient=augment``, ``tiles=2``,
``size=384``, ``coreset=0.025``, ``knn=faiss``); every variant is fit and timed on every folder,
and the summary table has one row per (folder, variant). ``--rotate 0,1``: each folder is also
measured as a randomly rotated copy per seed (``scripts/rotate_category.py``: train/good AND
test images and their masks, one uniform angle in [-180°, 180°) per file, corners filled by
reflection), written to a temporary folder and removed afterwards.

e.g. ``python benchmarks/patchcore.py ../shared/realdata/transistor``: the demo products
(``--products`` under ``--data``; ``--products ''`` for none) and then each MVTec-AD-layout
folder given, each with its own section, and a summary table at the end.

Per product it prints, for ours: fit seconds, ms per image, bare-backbone ms per image and the
ratio of total inference time to that backbone forward (target ≤ 1.3) — against our truncated,
BatchNorm-folded extractor and against timm's stock features_only forward — peak RSS, the k-NN
time of faiss IndexFlatL2 vs our exact torch search vs torch.cdist on the real bank and all test
patches, and all metrics; then the same for anomalib 2.7.0's ``PatchcoreModel`` with the same
EfficientNet-Lite weights loaded (strictly) into its timm extractor, on the same images.

How it is measured (the machine may be shared, so every time is a minimum over repeats):
  1. fit, ours: fresh process, min over ``--fit-repeats`` fits; the model is saved.
  2. fit, anomalib: fresh process in anomalib's venv, min over ``--fit-repeats``; bank saved.
  3. inference, both in ONE process (anomalib's venv holds the same torch/timm/opencv builds),
     batch by batch (8 images), interleaved: ours ``PatchCore.predict`` on uint8 images
     (conversion and numpy maps included), our bare extractor, timm's stock features_only
     forward, anomalib's ``PatchcoreModel.forward`` on normalised tensors and its extractor;
     per batch the min over ``--repeats``, summed. Both models meet the same load.
On a shared machine (other jobs on the same cores) wall times swing by 10× or more: torch's
two OpenMP threads wait for each other whenever one core is taken. ``--threads 1 --clock cpu``
then gives stable figures: one thread, process CPU time instead of wall time.
Peak RSS: of the fit process (ours: fit + predict + k-NN comparison; anomalib: fit). anomalib lives in a separate venv, never in the project's
requirements: set ANOMALIB_PYTHON (default /opt/anomalib-venv/bin/python) to its interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ANOMALIB_PYTHON = os.environ.get("ANOMALIB_PYTHON", "/opt/anomalib-venv/bin/python")
HOW_TO_ANOMALIB = ("python -m venv /opt/anomalib-venv && /opt/anomalib-venv/bin/pip install "
                   "torch==2.14.1 torchvision==0.29.1 && /opt/anomalib-venv/bin/pip install anomalib==2.7.0; "
                   "or set ANOMALIB_PYTHON to an interpreter that has anomalib 2.7.0")
# anomalib's KCenterGreedy allocates an [N x k] temporary (31 MB here) per iteration while
# appending small tensors to a list; with glibc's default (dynamic) mmap threshold the heap
# fragments and RSS grows by ~31 MB per iteration (OOM-killed at 22 GB on this machine). A fixed
# mmap threshold returns those blocks to the OS. It is set for anomalib's *fit* process only;
# inference runs in the default environment (a 1 MB threshold would slow every forward).
ANOMALIB_FIT_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
HEAD_KEYS = ("conv_head.", "bn2.", "classifier.")


_CLOCK = time.perf_counter


def _clock() -> float:
    return _CLOCK()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _options(args) -> dict:
    return json.loads(args.options) if args.options else {}


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


def _lite_sd(backbone: str, weights: str):
    """The offline weights renamed to timm keys, head dropped (what both extractors load)."""
    import timm
    import torch
    from pipelines.backbones import rename_lite_keys
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    depths = [len(s) for s in timm.create_model(f"tf_{backbone}", pretrained=False).blocks]
    return {k: v for k, v in rename_lite_keys(raw, depths).items() if not k.startswith(HEAD_KEYS)}


def _anomalib_model(backbone: str, weights: str):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    m = PatchcoreModel(layers=[2, 3], backbone=f"tf_{backbone}", pre_trained=False, num_neighbors=9)
    m.feature_extractor.feature_extractor.load_state_dict(_lite_sd(backbone, weights), strict=True)
    return m


# ------------------------------------------------------------------------------------------------
# workers (each runs in a fresh process and prints one JSON line)


def worker_fit_ours(args) -> dict:
    from pipelines.patchcore import NearestNeighbours, PatchCore, cdist_knn

    train, test, masks, labels = _load(Path(args.data), args.size)
    fits = []
    for _ in range(args.fit_repeats):
        model = PatchCore(**{"backbone": args.backbone, "coreset": args.coreset, "size": args.size,
                             "dim": args.dim, "knn": args.knn, "seed": 0, **_options(args)})
        t0 = _clock()
        model.fit(train)
        fits.append(_clock() - t0)
    model.save(args.out)
    scores, maps = model.predict(test)
    if args.skip_knn:
        return {"fit_s": min(fits), "bank": [model.bank_size, model.dim_out], "knn": None,
                "orientation": model.orientation, "metrics": _metrics(labels, scores, masks, maps),
                "peak_rss_mb": _peak_rss_mb()}
    # k-NN backends on the real bank and all test patches
    emb = model.embed(test).reshape(-1, model.dim_out)
    knn, ref = {}, None
    for name, search in (
            ("faiss_flat", NearestNeighbours(model.memory_bank, "faiss").search),
            ("torch_ours", NearestNeighbours(model.memory_bank, "torch").search),
            ("torch_cdist", lambda q, k: cdist_knn(q, model.memory_bank, k))):
        times = []
        for _ in range(args.repeats):
            t0 = _clock()
            _, i = search(emb, 1)
            times.append(_clock() - t0)
        ref = i if ref is None else ref
        knn[name] = {"s": min(times), "top1_agree": float((i == ref).float().mean())}
    # what predict() runs: nearest distances only (matmul + amax), no indices
    exact = NearestNeighbours(model.memory_bank, "torch")
    d_ref = cdist_knn(emb, model.memory_bank, 1)[0][:, 0]
    times = []
    for _ in range(args.repeats):
        t0 = _clock()
        d = exact.nearest_distance(emb)
        times.append(_clock() - t0)
    knn["torch_distances"] = {"s": min(times), "max_abs_diff": float((d - d_ref).abs().max())}
    return {"fit_s": min(fits), "bank": [model.bank_size, model.dim_out], "knn": {"queries": len(emb), **knn},
            "orientation": model.orientation, "metrics": _metrics(labels, scores, masks, maps), "peak_rss_mb": _peak_rss_mb()}


def worker_fit_anomalib(args) -> dict:
    import torch
    import anomalib

    train, *_ = _load(Path(args.data), args.size)
    fits = []
    for _ in range(args.fit_repeats):
        model = _anomalib_model(args.backbone, args.weights)
        torch.manual_seed(0)
        t0 = _clock()
        xs = _normalised_batches(train, args.backbone)
        model.train()
        with torch.inference_mode():
            for x in xs:
                model(x)
        model.subsample_embedding(args.coreset)
        fits.append(_clock() - t0)
    torch.save(model.memory_bank.clone(), args.out)
    return {"fit_s": min(fits), "bank": list(model.memory_bank.shape), "anomalib": anomalib.__version__,
            "peak_rss_mb": _peak_rss_mb()}


def _normalised_batches(imgs, backbone: str):
    """Batches of 8 normalised as our extractor does it (the weights' own normalisation), so
    anomalib's model and timm's stock forward see the very tensors ours sees."""
    import numpy as np
    import torch
    from pipelines.backbones import NORMALIZATIONS
    from pipelines.patchcore import default_normalization
    mean, std = NORMALIZATIONS[default_normalization(backbone)]
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return [(torch.from_numpy(np.stack(imgs[s:s + 8])).permute(0, 3, 1, 2).float() / 255 - mean) / std
            for s in range(0, len(imgs), 8)]


def worker_infer(args) -> dict:
    """Inference of ours (and anomalib's, when its bank is given), interleaved per batch."""
    import numpy as np
    import timm
    import torch
    from pipelines.patchcore import PatchCore

    ours = PatchCore.load(args.ours_model, weights=args.weights)
    _, test, masks, labels = _load(Path(args.data), ours.input_size)
    plain = timm.create_model(f"tf_{args.backbone}", pretrained=False, features_only=True,
                              out_indices=tuple(ours.extractor.layers))
    plain.load_state_dict(_lite_sd(args.backbone, args.weights))
    plain.eval()
    an = None
    if args.anomalib_bank:
        an = _anomalib_model(args.backbone, args.weights)
        an.memory_bank = torch.load(args.anomalib_bank, weights_only=True)
        an.eval()
    xs = _normalised_batches(test, args.backbone)
    t = {"ours": 0.0, "ours_backbone": 0.0, "plain_timm": 0.0, "anomalib": 0.0, "anomalib_backbone": 0.0,
         "orient": 0.0}
    with torch.inference_mode():
        outs = [an(x) for x in xs] if an is not None else []
        for b, xn in enumerate(xs):
            batch = test[8 * b: 8 * b + 8]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
            # the bare backbone on what the model feeds it (tiles included)
            steps = {"ours": lambda: ours.predict(batch), "ours_backbone": lambda: ours.extractor(ours.tile(x))}
            if ours.config["tiles"] == 1 and ours.input_size == args.size:
                steps["plain_timm"] = lambda: plain(xn)
            if ours.canon is not None:      # the registration alone (part of "ours")
                steps["orient"] = lambda: [ours.canon.pose(im) for im in batch]
            if an is not None:
                steps.update({"anomalib": lambda: an(xn), "anomalib_backbone": lambda: an.feature_extractor(xn)})
            best = {k: float("inf") for k in steps}
            for f in steps.values():               # warm-up
                f()
            for _ in range(args.repeats):
                for k, f in steps.items():
                    t0 = _clock()
                    f()
                    best[k] = min(best[k], _clock() - t0)
            for k, v in best.items():
                t[k] += v
    out = {k: 1000 * v / len(test) for k, v in t.items()}
    out["orient_used"] = ours.config["orient"]
    if an is not None:
        scores = torch.cat([o.pred_score.reshape(-1) for o in outs]).numpy()
        maps = torch.cat([o.anomaly_map.reshape(len(o.pred_score), *o.anomaly_map.shape[-2:])
                          for o in outs]).numpy()
        out["anomalib_metrics"] = _metrics(labels, scores, masks, maps)
    out["peak_rss_mb"] = _peak_rss_mb()
    out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------------------
# driver


def _run(python: str, worker: str, args, data: Path, env_extra: dict | None = None, **extra) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--data", str(data),
           "--backbone", args.backbone, "--coreset", str(args.coreset), "--size", str(args.size),
           "--repeats", str(args.repeats), "--fit-repeats", str(args.fit_repeats), "--knn", args.knn,
           "--dim", str(args.dim), "--weights", args.weights, "--threads", str(args.threads),
           "--clock", args.clock, "--options", json.dumps(getattr(args, "variant", {}))]
    if getattr(args, "skip_knn_now", False):
        cmd.append("--skip-knn")
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **(env_extra or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in m.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path,
                    help="MVTec-AD-layout category folders measured after the demo products")
    ap.add_argument("--data", default=str(ROOT / "assets" / "demo"))
    ap.add_argument("--products", default="bottle,brushed_metal")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--coreset", type=float, default=None,
                    help="coreset fraction (default: PatchCore's, 0.05; the CLI passes its --coreset)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dim", default="default", help="embedding dim (int, 'none' = the default rule)")
    ap.add_argument("--knn", default="auto", help="auto | faiss | torch")
    ap.add_argument("--repeats", type=int, default=7, help="inference repeats per batch (min taken)")
    ap.add_argument("--fit-repeats", type=int, default=2, help="fit repeats (min taken)")
    ap.add_argument("--no-anomalib", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--variants", default="default,orient=none",
                    help="comma-separated PatchCore settings: default, or key=value[+key=value] over the "
                         "defaults (orient=none|canonical|augment, tiles=2, size=384, coreset=0.025, knn=faiss …)")
    ap.add_argument("--rotate", default="", help="also measure a randomly rotated copy of every folder per "
                                                 "seed (comma-separated seeds), made in a temporary folder")
    ap.add_argument("--worker", choices=["fit_ours", "fit_anomalib", "infer"], help=argparse.SUPPRESS)
    ap.add_argument("--options", default="", help=argparse.SUPPRESS)
    ap.add_argument("--skip-knn", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ours-model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--anomalib-bank", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dim = None if args.dim.lower() in ("default", "none") else int(args.dim)

    if args.worker:
        global _CLOCK
        _CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        fn = {"fit_ours": worker_fit_ours, "fit_anomalib": worker_fit_anomalib, "infer": worker_infer}
        print(json.dumps(fn[args.worker](args)))
        return 0

    if args.coreset is None:
        from pipelines.patchcore import PatchCoreConfig
        args.coreset = PatchCoreConfig.coreset
    if not args.backbone.startswith("efficientnet_lite"):
        raise SystemExit("this benchmark uses the offline EfficientNet-Lite weights (efficientnet_lite0/1/2)")
    from pipelines.backbones import lite_weights_path
    args.weights = str(lite_weights_path(args.backbone))   # the very file both models load
    have_anomalib = Path(ANOMALIB_PYTHON).exists() and subprocess.run(
        [ANOMALIB_PYTHON, "-c", "import anomalib"], capture_output=True).returncode == 0
    use_anomalib = have_anomalib and not args.no_anomalib
    print(f"# PatchCore benchmark: backbone={args.backbone} size={args.size} coreset={args.coreset} "
          f"dim={args.dim or 'default'} knn={args.knn}; times = min over repeats "
          f"(inference {args.repeats}/batch, fit {args.fit_repeats}); {args.clock} clock, "
          f"{args.threads or 'default'} torch threads; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    folders = [Path(args.data) / p for p in args.products.split(",") if p] + list(args.folders)
    if not folders:
        raise SystemExit("nothing to measure: give category folders or --products")
    variants = [(v, _parse_variant(v)) for v in args.variants.split(",") if v]
    summary = []
    with tempfile.TemporaryDirectory() as rot_tmp:
        measured = [(d.name, d) for d in folders]
        if args.rotate:
            sys.path.insert(0, str(ROOT / "scripts"))
            from rotate_category import rotate_category
            for seed in [int(x) for x in args.rotate.split(",")]:
                for d in folders:
                    dst = Path(rot_tmp) / f"{d.name}-rot{seed}"
                    rotate_category(d, dst, seed=seed)
                    measured.append((f"{d.name} rotated (seed {seed})", dst))
        for name, data in measured:
            for label, variant in variants:
                print(f"\n## {name} — {label} ({data})")
                args.variant = variant
                args.skip_knn_now = label != variants[0][0]      # the k-NN comparison once per folder
                fit, inf = _measure(args, data, use_anomalib and label == "default", have_anomalib)
                summary.append((name, label, fit, inf))
    print("\n## summary (ours)\n")
    print("| category | variant | orient used | image AUROC | pixel AUROC | AUPRO | fit s | ms/image | "
          "backbone ms/image | ratio | registration ms/image | bank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label, fit, inf in summary:
        m = fit["metrics"]
        print(f"| {name} | {label} | {inf['orient_used']} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | "
              f"{m['aupro']:.4f} | {fit['fit_s']:.2f} | {inf['ours']:.1f} | {inf['ours_backbone']:.1f} | "
              f"{inf['ours'] / inf['ours_backbone']:.2f} | {inf['orient']:.2f} | {fit['bank'][0]} |")
    return 0


def _parse_variant(text: str) -> dict:
    """``default`` → {}; ``orient=none+tiles=2`` → {"orient": "none", "tiles": 2} (values read as
    JSON where they parse: numbers, true/false; else strings)."""
    from pipelines.patchcore import PatchCoreConfig
    if text == "default":
        return {}
    out = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key not in PatchCoreConfig.names():
            raise SystemExit(f"unknown PatchCore option {key!r} in --variants (known: {', '.join(PatchCoreConfig.names())})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _measure(args, data: Path, use_anomalib: bool, have_anomalib: bool) -> tuple[dict, dict]:
    """Fit + inference of one variant on one folder (fresh processes); prints its lines."""
    with tempfile.TemporaryDirectory() as tmp:
        fit = _run(sys.executable, "fit_ours", args, data, out=f"{tmp}/ours")
        an_fit, an_error = None, None
        if use_anomalib:
            try:
                an_fit = _run(ANOMALIB_PYTHON, "fit_anomalib", args, data, ANOMALIB_FIT_ENV,
                              out=f"{tmp}/anomalib_bank.pt")
            except RuntimeError as exc:
                an_error = exc
        inf = _run(ANOMALIB_PYTHON if an_fit else sys.executable, "infer", args, data,
                   ours_model=f"{tmp}/ours", anomalib_bank=f"{tmp}/anomalib_bank.pt" if an_fit else "")
    ratio = inf["ours"] / inf["ours_backbone"]
    plain = (f"; {inf['ours'] / inf['plain_timm']:.2f} vs timm's stock features_only forward, "
             f"{inf['plain_timm']:.1f} ms/image" if inf.get("plain_timm") else "")
    o = fit.get("orientation") or {}
    print(f"ours     : fit {fit['fit_s']:.2f} s | {inf['ours']:.1f} ms/image | backbone "
          f"{inf['ours_backbone']:.1f} ms/image | ratio {ratio:.2f} (target <= 1.3{plain}) | peak RSS "
          f"{fit['peak_rss_mb']:.0f} MB | bank {fit['bank'][0]} x {fit['bank'][1]}")
    print(f"           orient {o.get('requested')} -> {o.get('used')}"
          + (f" (rotation gain {o['rotation_gain']:.3f})" if "rotation_gain" in o else "")
          + (f" | registration {inf['orient']:.2f} ms/image" if inf.get("orient") else ""))
    print(f"           {_fmt_metrics(fit['metrics'])}")
    k = fit["knn"]
    if k:
        print(f"  kNN {k['queries']} queries: faiss IndexFlatL2 {1000 * k['faiss_flat']['s']:.0f} ms | ours (exact torch "
              f"matmul+max) {1000 * k['torch_ours']['s']:.0f} ms (top-1 agree {k['torch_ours']['top1_agree']:.4f}) | "
              f"torch.cdist {1000 * k['torch_cdist']['s']:.0f} ms (agree {k['torch_cdist']['top1_agree']:.4f}) | "
              f"distances only, as predict() runs (matmul+amax) {1000 * k['torch_distances']['s']:.0f} ms "
              f"(max |d - cdist| {k['torch_distances']['max_abs_diff']:.1e})")
    if not use_anomalib:
        if not have_anomalib and not args.no_anomalib:
            print(f"anomalib : not installed ({HOW_TO_ANOMALIB})")
        return fit, inf
    if an_error is not None:
        print(f"anomalib : failed — {an_error}")
        return fit, inf
    am = inf["anomalib_metrics"]
    print(f"anomalib : fit {an_fit['fit_s']:.2f} s | {inf['anomalib']:.1f} ms/image | backbone "
          f"{inf['anomalib_backbone']:.1f} ms/image | ratio {inf['anomalib'] / inf['anomalib_backbone']:.2f} | "
          f"peak RSS {an_fit['peak_rss_mb']:.0f} MB | bank {an_fit['bank'][0]} x "
          f"{an_fit['bank'][1]} (anomalib {an_fit['anomalib']})")
    print(f"           {_fmt_metrics(am)}")
    print(f"           (anomalib PatchcoreModel, same images / normalisation / weights; its fit ran with "
          f"{' '.join(f'{a}={b}' for a, b in ANOMALIB_FIT_ENV.items())}, see ANOMALIB_FIT_ENV; inference "
          f"interleaved with ours in one process)")
    print(f"  speed-up: fit {an_fit['fit_s'] / fit['fit_s']:.1f}x (aim >= 5x), inference "
          f"{inf['anomalib'] / inf['ours']:.2f}x (aim >= 1.8x); "
          + ", ".join(f"{m} {fit['metrics'][m] - am[m]:+.4f}" for m in ("image_auroc", "pixel_auroc", "aupro"))
          + " (ours - anomalib)")
    return fit, inf


if __name__ == "__main__":
    raise SystemExit(main())
