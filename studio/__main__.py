"""Headless CLI: ``python -m studio {demo-data,import,generate,export,samples,review} --help``.

Every command exits non-zero with a one-line message on bad input (never a traceback for a
user error) and writes nothing partial.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.cli.progress import tqdm_progress


def _store(args):
    from studio.config import Settings
    from studio.dataset import Store
    settings = Settings.from_env(workspace=getattr(args, "workspace", None))
    return Store(settings.workspace, max_pixels=settings.max_pixels)


def cmd_demo_data(args) -> int:
    from pipelines.demo_data import write_demo_dataset
    counts = write_demo_dataset(Path(args.out), n_train_good=args.n_train, size=args.size, seed=args.seed)
    print(json.dumps(counts, indent=1))
    return 0


def cmd_import(args) -> int:
    store = _store(args)
    src = Path(args.path)
    if not src.exists():
        raise SystemExit(f"error: {src} does not exist")
    from studio.formats import import_any
    try:
        report = import_any(store, src, args.kind, args.product, split=args.split, label=args.label)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    print(json.dumps(report, indent=1, default=str))
    return 0


def _generate_request(args, image, mask):
    """``generate`` and ``generate-batch`` build their request the same way (one flag set)."""
    from pipelines.registry import all_option_specs
    from studio.services import GenerateRequest
    options = {name: getattr(args, "opt_" + name) for name in all_option_specs()}
    if getattr(args, "full_frame", False):
        options["only_masked"] = False
    return GenerateRequest(image=image, mask=mask, damage_type=args.damage, color=args.color,
                           product=args.product or "", backend=args.backend, n=args.n, seed=args.seed,
                           feather=args.feather, strength=args.strength, max_pixels=args.max_pixels,
                           options={k: v for k, v in options.items() if v is not None})


def add_generation_flags(sp) -> None:
    """The flags of ``generate`` and ``generate-batch``: the request's, then one per generator
    option, generated from each generator's options dataclass (``pipelines.registry``)."""
    from pipelines.registry import GENERATORS, all_option_specs, auto_description, backend_status, get_info
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--damage", help="damage type, e.g. scratch, contamination, broken_large, good")
    g.add_argument("--color", help="wall colour '#RRGGBB' (wall-colour mode)")
    lines = [f"{n} ({get_info(n).mode}{'' if backend_status(n)[0] else ', not set up here'}): "
             f"{get_info(n).description}" for n in GENERATORS]
    sp.add_argument("--backend", default="auto", choices=["auto", *GENERATORS], metavar="BACKEND",
                    help=f"{auto_description('damage')} (with --color: {auto_description('color')[6:]}). "
                         + " | ".join(lines))
    sp.add_argument("--product", help="product (checks the damage type; cut-paste donors come from it)")
    sp.add_argument("--n", type=int, default=4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--feather", type=int, default=4, help="feather radius in px")
    sp.add_argument("--strength", type=float, default=0.8)
    sp.add_argument("--max-pixels", type=int, default=40_000_000)
    sp.add_argument("--full-frame", action="store_true", help="same as --no-only-masked")
    og = sp.add_argument_group("generator options (each generator takes its own; see --backend)")
    for name, (spec, users) in all_option_specs().items():
        rng = f" [{spec.min:g}..{spec.max:g}]" if spec.min is not None and spec.max is not None else ""
        helptext = f"{spec.help}{rng} (default {spec.default}; {', '.join(users)})"
        kw = dict(dest="opt_" + name, default=None, help=helptext)
        if spec.type is bool:
            og.add_argument(spec.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            og.add_argument(spec.flag, type=spec.type, choices=spec.choices,
                            metavar=None if spec.choices else name.upper(), **kw)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from pipelines.imageio import ImageInputError, read_mask, read_rgb, write_png_atomic
    from studio.services import UserError, generate

    try:
        image = read_rgb(args.image, args.max_pixels)
        mask = read_mask(args.mask, args.max_pixels) if args.mask else None
    except ImageInputError as exc:
        raise SystemExit(f"error: {exc}")
    store = _store(args) if args.record else None
    from studio.catalog import Catalog
    from studio.config import Settings
    catalog = Catalog()
    if store is not None:
        catalog = catalog.with_labels({p: store.labels(p) for p in store.products()})
    req = _generate_request(args, image, mask)
    bar = tqdm(total=args.n, desc="generate", unit="img", disable=args.quiet)
    last = [0]

    def progress(frac, msg):
        done = round(frac * args.n)
        bar.update(done - last[0])
        last[0] = done

    try:
        cands = generate(req, store=store, catalog=catalog, progress=progress,
                         workspace=Settings.from_env(workspace=getattr(args, "workspace", None)).workspace)
    except (UserError, KeyError) as exc:
        bar.close()
        raise SystemExit(f"error: {exc.args[0] if exc.args else exc}")
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, c in enumerate(cands):
        path = write_png_atomic(out / f"candidate_{i:02d}.png", c.image)
        records.append({"file": path.name, "seed": c.seed, "generator": c.generator,
                        "generator_version": c.generator_version, "params": c.params,
                        "sample_id": c.sample_id})
    if cands and cands[0].mask is not None and cands[0].mask.any():
        write_png_atomic(out / "mask.png", cands[0].mask)
    meta = {"image": str(args.image), "mask": str(args.mask) if args.mask else None,
            "damage_type": args.damage, "color": args.color, "candidates": records}
    (out / "provenance.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {len(cands)} candidate(s) to {out}")
    return 0


def _batch_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    from pipelines.imageio import IMAGE_SUFFIXES
    pairs, missing = [], []
    for img in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        cands = [masks_dir / f"{img.stem}{suf}" for suf in (".png", "_mask.png", img.suffix)]
        mask = next((c for c in cands if c.is_file()), None)
        (pairs.append((img, mask)) if mask else missing.append(img.name))
    if missing:
        raise SystemExit(f"error: no mask in {masks_dir} for: {', '.join(missing[:10])}"
                         f"{' …' if len(missing) > 10 else ''} (expected NAME.png or NAME_mask.png)")
    if not pairs:
        raise SystemExit(f"error: no images in {images_dir}")
    return pairs


def cmd_generate_batch(args) -> int:
    """Every image+mask pair of two folders; under `accelerate launch` the pairs are split across
    processes (each writes its own OUT/<name>/ folder), unchanged code in a single process."""
    from accelerate import PartialState

    from pipelines.imageio import ImageInputError, read_mask, read_rgb, write_png_atomic
    from studio.config import Settings
    from studio.services import UserError, generate

    import torch
    # on a CPU-only machine the processes of `accelerate launch` / torchrun talk over gloo
    state = PartialState(cpu=not torch.cuda.is_available())
    pairs = _batch_pairs(Path(args.images), Path(args.masks))
    failures = []
    with state.split_between_processes(pairs) as mine:
        for img_path, mask_path in mine:
            target = Path(args.out) / img_path.stem
            try:
                req = _generate_request(args, read_rgb(img_path, args.max_pixels),
                                        read_mask(mask_path, args.max_pixels))
                cands = generate(req, workspace=Settings.from_env().workspace)   # its trained models
            except (ImageInputError, UserError, KeyError) as exc:
                failures.append(f"{img_path.name}: {exc}")
                continue
            for i, c in enumerate(cands):
                write_png_atomic(target / f"candidate_{i:02d}.png", c.image)
            (target / "provenance.json").write_text(json.dumps(
                {"image": str(img_path), "mask": str(mask_path), "process": state.process_index,
                 "candidates": [{"seed": c.seed, "generator": c.generator, "params": c.params}
                                for c in cands]}, indent=1, default=str))
            print(f"[{state.process_index}] {img_path.name}: {len(cands)} candidate(s)")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 2 if failures else 0


def cmd_export(args) -> int:
    store = _store(args)
    if args.product not in store.products():
        raise SystemExit(f"error: no product {args.product!r} in the workspace; known: "
                         f"{', '.join(store.products()) or '(none)'}")
    if args.format == "coco":
        from studio.formats.coco import export_coco
        print(json.dumps(export_coco(store, args.product, Path(args.out)), indent=1))
    else:
        print(json.dumps(store.export_mvtec(Path(args.out), args.product), indent=1, default=str))
    return 0


def cmd_samples(args) -> int:
    store = _store(args)
    rows = store.list_samples(product=args.product, status=args.status, limit=args.limit)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("id", "product", "damage_type", "color", "generator",
                                            "seed", "status", "note", "created_at")}, default=str))
    return 0


def cmd_review(args) -> int:
    from studio.services import UserError, review
    store = _store(args)
    try:
        row = review(store, args.id, args.decision, note=args.note)
    except (UserError, KeyError) as exc:
        raise SystemExit(f"error: {exc}")
    print(json.dumps({"id": row["id"], "status": row["status"]}))
    return 0


def cmd_roles(args) -> int:
    """List real defect images with their data role, or set one (``--set ID ROLE``); with
    ``--data FOLDER``, print the split a category folder gets (the same rule as the store)."""
    if args.data:
        from pipelines.mvtec import LayoutError
        from pipelines.roles import folder_roles
        try:
            r = folder_roles(args.data)
        except (LayoutError, ValueError) as exc:
            raise SystemExit(f"error: {exc}")
        for role, samples in (("reference", r.reference), ("evaluation", r.evaluation)):
            for rel in r.rel(samples):
                print(json.dumps({"file": rel, "role": role}))
        print(f"{len(r.reference)} reference, {len(r.evaluation)} evaluation (from {r.source})", file=sys.stderr)
        return 0
    store = _store(args)
    if args.set:
        try:
            row = store.set_role(int(args.set[0]), args.set[1])
        except ValueError as exc:
            raise SystemExit(f"error: {exc}")
        print(json.dumps({"id": row["id"], "label": row["label"], "role": row["role"],
                          "stale_runs": row.get("stale_runs", [])}))
        if row.get("stale_runs"):
            print(f"{len(row['stale_runs'])} run(s) that scored this image are now marked stale: "
                  f"{', '.join(map(str, row['stale_runs']))} (python -m studio runs)", file=sys.stderr)
        return 0
    for r in store.list_images(product=args.product, origin="real"):
        if r["label"] != "good":
            print(json.dumps({k: r[k] for k in ("id", "product", "split", "label", "role", "source_path")}))
    return 0


def cmd_runs(args) -> int:
    """Recorded runs (JSON lines): id, kind, product, status, the headline metrics, and ``stale``
    when an image the run scored has since become reference (its numbers no longer hold)."""
    from studio.config import Settings
    from studio.runs import RunLog
    ws = Settings.from_env(workspace=args.workspace).workspace
    if not (Path(ws) / "studio.db").is_file():
        return 0
    for r in RunLog(ws).list(args.kind, args.product, args.limit):
        m = r["metrics"] or {}
        print(json.dumps({"id": r["id"], "kind": r["kind"], "product": r["product"], "status": r["status"],
                          **{k: round(m[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")
                             if isinstance(m.get(k), (int, float))},
                          "stale": r.get("stale") or None, "created_at": r["created_at"]}))
    return 0


def cmd_patchcore(args) -> int:
    from studio.evaluation import PatchCoreRequest, run_patchcore
    bank = args.bank or ("dual-real-synthetic" if args.positives else "single")
    req = PatchCoreRequest(data=args.data, out=args.out, bank=bank, positives=args.positives,
                           backbone=args.backbone, coreset=args.coreset, size=args.size,
                           seed=args.seed,
                           positive_coreset=args.positive_coreset, orient=args.orient, tiles=args.tiles)
    bar, progress = tqdm_progress("patchcore", args.quiet)

    run_id = None
    if args.record:
        from studio.config import Settings
        from studio.runs import RunLog
        runlog = RunLog(Settings.from_env(workspace=args.workspace).workspace)
        run_id = runlog.start("patchcore", Path(args.data).name, args.data, req.__dict__, args.out)
    try:
        summary = run_patchcore(req, progress=progress)
    except BaseException as exc:
        bar.close()
        if run_id is not None:
            runlog.finish(run_id, status="failed", error=str(exc))
        raise
    bar.close()
    if run_id is not None:
        runlog.finish(run_id, summary["metrics"], scored=summary.get("scored_hashes"))
    for note in summary.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    m = summary["metrics"]
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "fit_seconds",
            "ms_per_image", "backbone_ms_per_image")
    print(json.dumps({**{k: round(m[k], 4) for k in keys if k in m},
                      **{k: m[k] for k in ("orient", "rotation_gain", "tiles") if k in m}}, indent=1))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {len(summary['overlays'])} overlays")
    return 0


def cmd_ddpm_train(args) -> int:
    from studio.inspection import DDPMTrainRequest, train_ddpm
    minutes = args.minutes if (args.minutes is not None or args.steps) else 20.0
    req = DDPMTrainRequest(data=args.data, out=args.out, minutes=minutes, steps=args.steps,
                           noise=args.noise, prediction=args.prediction, size=args.size, crop=args.crop,
                           preset=args.preset, t_max=args.t_max, batch_size=args.batch_size, rot90=not args.no_rot90,
                           resume=args.resume, seed=args.seed)
    bar, progress = tqdm_progress("ddpm train", args.quiet)
    try:
        summary = train_ddpm(req, progress=progress)
    finally:
        bar.close()
    print(json.dumps({k: summary[k] for k in ("checkpoint", "step", "steps_this_run", "seconds",
                                              "loss", "stopped", "parameters")}, indent=1))
    return 0


def cmd_ddpm_evaluate(args) -> int:
    from studio.inspection import DDPMEvalRequest, evaluate_ddpm
    depths = [int(d) for part in args.depth for d in str(part).split(",") if d.strip()]
    req = DDPMEvalRequest(data=args.data, checkpoint=args.checkpoint, out=args.out,
                          depths=depths or [50], noise=args.noise, kind=args.residual,
                          seeds=list(range(args.seeds)), eval_size=args.size)
    bar, progress = tqdm_progress("ddpm evaluate", args.quiet)
    try:
        summary = evaluate_ddpm(req, progress=progress)
    finally:
        bar.close()
    m = summary["metrics"]
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "ms_per_image")
    print(json.dumps({k: round(m[k], 4) for k in keys if k in m}, indent=1))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {len(summary['overlays'])} overlays")
    return 0


def cmd_ddpm_grid(args) -> int:
    from studio.inspection import DDPMGridRequest, depth_grid, grid_items_from_folder
    depths = [int(d) for part in args.depth for d in str(part).split(",") if d.strip()]
    req = DDPMGridRequest(checkpoint=args.checkpoint, out=args.out, depths=depths or [100, 250, 400, 600],
                          noise=args.noise, seed=args.seed, kind=args.residual)
    bar, progress = tqdm_progress("ddpm grid", args.quiet)
    try:
        summary = depth_grid(req, grid_items_from_folder(args.data, args.images), progress=progress)
    finally:
        bar.close()
    print(f"wrote {summary['grid']} ({len(summary['depths'])} depths x {len(summary['images'])} images) "
          f"and {Path(summary['grid']).with_suffix('.json')}")
    return 0


def cmd_experiment(args) -> int:
    from studio.experiment import METRIC_KEYS, ExperimentRequest, run_experiment, source_blocks
    req = ExperimentRequest(data=args.data, out=args.out, synthetic=args.synthetic, generate=args.generate,
                            per_type=args.per_type, repeats=args.repeats, seed=args.seed,
                            backbone=args.backbone, coreset=args.coreset, size=args.size,
                            positive_coreset=args.positive_coreset, segmenter_steps=args.segmenter_steps, n_boot=args.bootstrap,
                            strength=args.strength, model=args.model, threads=args.threads,
                            workspace=args.workspace, folds=args.folds)
    bar, progress = tqdm_progress("experiment", args.quiet)
    try:
        r = run_experiment(req, progress=progress)
    finally:
        bar.close()
    for src, b in source_blocks(r).items():
        print(f"[{src}]")
        for model, arms in (("patchcore", ("reference_only", "reference_plus_synthetic", "delta")),
                            ("segmenter", ("synthetic_only", "reference_only", "reference_plus_synthetic",
                                           "delta", "delta_synthetic_only"))):
            for arm in arms:
                v = b[model][arm]
                fmt = "{:+.4f}" if arm.startswith("delta") else "{:.4f}"
                ci = {k: v[k].get("ci_adjusted", v[k]["ci95"]) for k in METRIC_KEYS}
                print(f"  {model:9s} {arm:25s} " + "  ".join(
                    f"{k}={fmt.format(v[k]['mean'])} [{fmt.format(ci[k][0])}, {fmt.format(ci[k][1])}]"
                    + (f" {v[k]['verdict']}" if arm.startswith("delta") and v[k].get("verdict") else "")
                    for k in METRIC_KEYS))
        print(f"  verdict (Holm-adjusted over the run's {r['protocol'].get('multiple_comparisons', {}).get('family_size', '?')} "
              f"verdicts): {b['verdict']['text']}")
    for note in r.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'metrics.json'}, report.md and figure.html ({r['seconds']:.0f} s)")
    return 0


TRAIN_FLAGS = ("data", "output_dir", "model", "damage_types", "extra_data", "max_steps", "minutes",
               "rank", "learning_rate", "resolution", "batch_size", "checkpoint_every", "mixed_precision",
               "image_size", "seed", "controlnet")


def cmd_train(args) -> int:
    """The ``--kind`` trainer (``TRAINERS``) from a YAML config and/or flags; flags override the file."""
    from pipelines.training.trainers import TRAINERS
    from studio.wall_cli import WALL_FLAGS
    trainer = TRAINERS[args.kind]
    Config = trainer.config_class()
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS + WALL_FLAGS if getattr(args, k, None) is not None}
    if args.no_resume:
        overrides["resume"] = False
    if "damage_types" in overrides:
        overrides["damage_types"] = [t for t in overrides["damage_types"].split(",") if t]
    known = set(Config.known_keys())
    overrides = {k: v for k, v in overrides.items() if k in known}  # e.g. no 'rank' for pixel-inpaint
    cfg = Config.from_yaml(args.config, **overrides) if args.config else Config.from_dict({}, **overrides)
    cancel_file = Path(args.cancel_file) if args.cancel_file else None
    bar, tq = tqdm_progress(f"train {args.kind}", args.quiet)

    def progress(frac, msg=""):
        tq(frac, msg)
        if args.progress_lines:  # machine-readable, for the Training tab's job
            print(f"PROGRESS {frac:.4f} {msg}", flush=True)

    try:
        res = trainer.run(cfg, progress, (lambda: cancel_file.exists()) if cancel_file else None)
    except RuntimeError as exc:  # CheckpointError, Cancelled: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        bar.close()
    print(json.dumps({"step": res.step, "steps_this_run": res.steps_this_run, "seconds": round(res.seconds, 1),
                      "loss": res.loss, "stopped": res.stopped, "checkpoint": res.checkpoint,
                      "validation": res.validation}, indent=1))
    return 0


def _add_dataset_commands(sub, ws) -> None:
    """demo data, import, export, samples, roles, review."""
    sp = sub.add_parser("demo-data", help="write the deterministic MVTec-layout demo set")
    sp.add_argument("--out", required=True, help="output folder (one sub-folder per product)")
    sp.add_argument("--n-train", type=int, default=30, help="good training images per product")
    sp.add_argument("--size", type=int, default=256, help="image size in px (256..512)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_demo_data)

    sp = sub.add_parser("import", help="import an MVTec AD / VisA category, a KolektorSDD2 folder or plain images")
    sp.add_argument("path")
    sp.add_argument("--kind", "--layout", dest="kind", choices=["auto", "mvtec", "visa", "ksdd2", "folder"],
                    default="auto", help="the folder's layout (default: detected)")
    sp.add_argument("--product", help="product name (default: the folder name)")
    sp.add_argument("--split", default="train", choices=["train", "test"], help="for --kind folder")
    sp.add_argument("--label", default="good", help="for --kind folder")
    ws(sp)
    sp.set_defaults(fn=cmd_import)

    sp = sub.add_parser("export", help="export real images + accepted samples to the MVTec AD layout")
    sp.add_argument("--product", required=True)
    sp.add_argument("--format", choices=["mvtec", "coco"], default="mvtec",
                    help="mvtec: MVTec AD folders (+ synthetic/); coco: images/ + annotations.json (RLE masks)")
    sp.add_argument("--out", required=True)
    ws(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("samples", help="list samples (JSON lines)")
    sp.add_argument("--product")
    sp.add_argument("--status", choices=["candidate", "accepted", "rejected"])
    sp.add_argument("--limit", type=int, default=50)
    ws(sp)
    sp.set_defaults(fn=cmd_samples)

    sp = sub.add_parser("roles", help="data roles of real defects: list, set, or show a folder's split",
                        description="Every real defect image is 'reference' (may be learned from or "
                                    "copied) or 'evaluation' (only ever scored).")
    sp.add_argument("--product")
    sp.add_argument("--set", nargs=2, metavar=("IMAGE_ID", "ROLE"), help="ROLE: reference | evaluation")
    sp.add_argument("--data", help="a category folder: print the split it gets (evaluation.txt or the rule)")
    ws(sp)
    sp.set_defaults(fn=cmd_roles)

    sp = sub.add_parser("runs", help="recorded runs (JSON lines), with 'stale' when an image a run scored "
                                     "has since become reference")
    sp.add_argument("--kind")
    sp.add_argument("--product")
    sp.add_argument("--limit", type=int, default=100)
    ws(sp)
    sp.set_defaults(fn=cmd_runs)

    sp = sub.add_parser("review", help="accept or reject a candidate")
    sp.add_argument("id", type=int)
    sp.add_argument("decision", choices=["accepted", "rejected", "candidate"])
    sp.add_argument("--note")
    ws(sp)
    sp.set_defaults(fn=cmd_review)



def _print_monitor(monitor: dict) -> None:
    from studio.curation import monitor_lines
    for line in monitor_lines(monitor):
        print(line)


def cmd_plan_make(args) -> int:
    from studio.curation import CurationDB, make_plan
    store = _store(args)
    labels = [x for x in (args.labels or "").split(",") if x] or None
    plan = make_plan(store, CurationDB(store.root), args.product,
                     target=args.target, labels=labels, backends=tuple(b for b in args.backends.split(",") if b),
                     oversample=args.oversample, seed=args.seed, mode=args.mode, mix=args.mix,
                     retries=args.retries)
    for row in plan["summary"]:
        print(json.dumps({k: row[k] for k in ("label", "current", "target", "deficit", "planned", "complete_at",
                                              "backends", "mix") if k in row}))
    print(f"plan #{plan['plan_id']}: {plan['items']} item(s), mode {plan['mode']}, up to {plan['retries']} "
          f"retries per item; run it with: python -m studio plan run {plan['plan_id']}")
    return 0


def cmd_plan_run(args) -> int:
    from studio.curation import CurationDB, Thresholds, run_plan
    store = _store(args)
    th = Thresholds(min_visibility=args.min_visibility, min_duplicate_distance=args.min_distance)
    bar, progress = tqdm_progress("plan", args.quiet)
    try:
        r = run_plan(store, CurationDB(store.root), args.id,
                     progress=progress, thresholds=th, use_detector=not args.no_detector, retries=args.retries)
    finally:
        bar.close()
    print(json.dumps({k: v for k, v in r.items() if k != "monitor"}))
    _print_monitor(r["monitor"])
    return 0


def cmd_plan_status(args) -> int:
    from studio.curation import CurationDB, plan_status
    store = _store(args)
    st = plan_status(CurationDB(store.root), args.id)
    print(json.dumps({k: st[k] for k in ("plan_id", "product", "done", "pending", "total", "params")}))
    _print_monitor(st["monitor"])
    return 0


def _add_plan_commands(sub, ws) -> None:
    """plan make | run | status (the Curation tab's balancing plan, headless)."""
    from studio.curation import COMPLETE_FRACTION, MAX_RETRIES, TARGET_MODES, VERIFY_THRESHOLD, Thresholds
    pp = sub.add_parser("plan", help="balancing plan: make | run | status (retries, success rate, attribute mix)")
    psub = pp.add_subparsers(dest="plan_cmd", required=True)
    sp = psub.add_parser("make", help="plan candidates per defect class (prints the plan)")
    sp.add_argument("--product", required=True)
    sp.add_argument("--mode", choices=TARGET_MODES, default="balance",
                    help="balance: top every class up to the largest (or to --target, real + accepted); "
                         "fixed: --target new synthetic samples per class")
    sp.add_argument("--target", type=int, help="per-class target (required with --mode fixed); a class is "
                                               f"complete at >= {int(COMPLETE_FRACTION * 100)} %% of it")
    sp.add_argument("--labels", help="comma-separated classes (default: all)")
    sp.add_argument("--backends", default="perlin,cutpaste", help="comma-separated generators")
    sp.add_argument("--oversample", type=float, default=1.0, help="plan this many times the deficit")
    sp.add_argument("--mix", help="attribute mix, e.g. 'severity=low:0.5,high:0.5' (several: separate with ';'); "
                                  "each item gets values matching the shares, recorded in its provenance; "
                                  "severity low|medium|high also sets the generator strength")
    sp.add_argument("--retries", type=int, default=MAX_RETRIES,
                    help=f"regenerations (new seed) of a candidate whose verification score is below "
                         f"{VERIFY_THRESHOLD} (default {MAX_RETRIES})")
    sp.add_argument("--seed", type=int, default=0)
    ws(sp)
    sp.set_defaults(fn=cmd_plan_make)
    sp = psub.add_parser("run", help="generate a plan's pending candidates (resumable); prints the "
                                     "success rate per class")
    sp.add_argument("id", type=int, help="plan id")
    sp.add_argument("--retries", type=int, help="override the plan's retries")
    sp.add_argument("--min-visibility", type=float, default=Thresholds.min_visibility,
                    help="PatchCore inside / around the mask that scores 0.6")
    sp.add_argument("--min-distance", type=int, default=Thresholds.min_duplicate_distance,
                    help="perceptual-hash bits to the class's other candidates that score 0.6")
    sp.add_argument("--no-detector", action="store_true", help="skip the PatchCore visibility check")
    sp.add_argument("--quiet", action="store_true")
    ws(sp)
    sp.set_defaults(fn=cmd_plan_run)
    sp = psub.add_parser("status", help="a plan's progress and success-rate monitor")
    sp.add_argument("id", type=int)
    ws(sp)
    sp.set_defaults(fn=cmd_plan_status)


def _add_generation_commands(sub, ws) -> None:
    """generate, generate-batch (flags generated from the generators' options)."""
    sp = sub.add_parser("generate", help="make N candidates for an image + mask")
    sp.add_argument("--image", required=True)
    sp.add_argument("--mask", help="mask image (white or alpha = defect); not needed for --damage good")
    add_generation_flags(sp)
    sp.add_argument("--record", action="store_true", help="also save the candidates in the workspace")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--out", required=True)
    ws(sp)
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("generate-batch",
                        help="candidates for every image+mask pair of two folders (accelerate launch splits them)")
    sp.add_argument("--images", required=True, help="folder of images")
    sp.add_argument("--masks", required=True, help="folder of masks named like the images (or NAME_mask.png)")
    add_generation_flags(sp)
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_generate_batch)



def _add_evaluation_commands(sub, ws) -> None:
    """patchcore, ddpm train | evaluate | grid, experiment."""
    _add_patchcore_command(sub, ws)
    _add_ddpm_commands(sub)
    _add_experiment_command(sub, ws)


def _add_patchcore_command(sub, ws) -> None:
    sp = sub.add_parser("patchcore", help="fit PatchCore on train/good and evaluate on test/ (MVTec AD or "
                                          "KolektorSDD2 layout)")
    sp.add_argument("--data", required=True, help="MVTec-AD-layout category folder, or a KolektorSDD2 folder "
                                                  "(train/NNNNN.png + NNNNN_GT.png, test/ likewise)")
    sp.add_argument("--positives", help="an export of accepted synthetic defects for a dual bank: only its "
                                        "synthetic/ + synthetic_ground_truth/ are read (never test/); the "
                                        "real reference defects of --data are in the dual bank already")
    sp.add_argument("--bank", choices=["single", "dual-real", "dual-real-synthetic"],
                    help="default: single, or dual-real-synthetic with --positives")
    sp.add_argument("--backbone", default="efficientnet_lite0")
    sp.add_argument("--coreset", type=float, default=0.05,
                    help="normal (negative) bank: fraction of patches kept, (0, 1] (default 0.05: measured; "
                         "the specification's 0.01 lost pixel AUROC on MVTec AD transistor, 0.960 vs 0.971)")
    sp.add_argument("--positive-coreset", type=float, default=0.1,
                    help="positive (defect) bank of a dual bank: fraction of the eligible defect cells "
                         "kept, (0, 1] (default 0.1, the specification's)")
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--orient", choices=["auto", "none", "canonical", "augment"], default="auto",
                    help="parts in any orientation: canonical = each image turned to a reference pose made "
                         "from train/good (map turned back; ~+1 ms per image), augment = the bank also holds "
                         "the train images rotated every 45° (bank and k-NN x8), auto (default) = canonical "
                         "when the train images differ in orientation, else none (aligned products: "
                         "unchanged results)")
    sp.add_argument("--tiles", type=int, default=1, choices=[1, 2, 3, 4],
                    help="small defects: work on tiles x tiles tiles of --size px (tiles² x the backbone's "
                         "time; the bank and the k-NN grow likewise)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--record", action="store_true", help="record the run in the workspace database")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--out", required=True)
    ws(sp)
    sp.set_defaults(fn=cmd_patchcore)


def _add_ddpm_commands(sub) -> None:
    dp = sub.add_parser("ddpm", help="pixel-space DDPM residual maps: train | evaluate | grid")
    dsub = dp.add_subparsers(dest="ddpm_cmd", required=True)
    sp = dsub.add_parser("train", help="train on CATEGORY/train/good (time or step budget, resumable)")
    sp.add_argument("--data", required=True, help="MVTec-AD-layout category folder")
    sp.add_argument("--out", required=True, help="checkpoint folder")
    sp.add_argument("--minutes", type=float, default=None, help="time budget (default 20 unless --steps)")
    sp.add_argument("--steps", type=int, help="total step target")
    sp.add_argument("--noise", choices=["gaussian", "simplex"], default="gaussian")
    sp.add_argument("--prediction", choices=["v", "epsilon"], default="v",
                    help="what the U-Net predicts: v (velocity) or epsilon (the noise)")
    sp.add_argument("--size", type=int, default=128, help="working resolution")
    sp.add_argument("--crop", type=int, default=64, help="training window (U-Net sample size)")
    sp.add_argument("--preset", default="small", help="model size: tiny | small | default")
    sp.add_argument("--t-max", type=int, default=350, help="train on timesteps below this (match --depth)")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--no-rot90", action="store_true", help="no 90° rotations (oriented textures)")
    sp.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_ddpm_train)
    sp = dsub.add_parser("evaluate", help="residual maps on CATEGORY/test and metrics")
    sp.add_argument("--data", required=True)
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--depth", action="append", default=[], help="noising depth t (repeat or comma list)")
    sp.add_argument("--noise", choices=["gaussian", "simplex"], help="default: as trained")
    sp.add_argument("--residual", choices=["color", "ssim", "feature", "color+ssim", "color+feature"],
                    default="color")
    sp.add_argument("--seeds", type=int, default=1, help="reconstructions averaged per depth")
    sp.add_argument("--size", type=int, default=256, help="evaluation resolution")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_ddpm_evaluate)
    sp = dsub.add_parser("grid", help="depth x image grid: reconstructions and residuals of a few test "
                                      "images at several depths (failure analysis)")
    sp.add_argument("--data", required=True, help="MVTec-AD-layout category (its test images)")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--depth", action="append", default=[],
                    help="noising depth t (repeat or comma list; default 100,250,400,600)")
    sp.add_argument("--images", type=int, default=4, help="test images (defect types first, then good)")
    sp.add_argument("--noise", choices=["gaussian", "simplex"], help="default: as trained")
    sp.add_argument("--residual", choices=["color", "ssim", "feature", "color+ssim", "color+feature"],
                    default="color")
    sp.add_argument("--seed", type=int, default=0, help="noise seed (the same for every depth)")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--out", required=True, help="the grid picture (PNG); cell figures go beside it (.json)")
    sp.set_defaults(fn=cmd_ddpm_grid)


def _add_experiment_command(sub, ws) -> None:
    sp = sub.add_parser("experiment", help="did synthetic data help? PatchCore dual bank + a supervised "
                                           "segmenter, K repeats, bootstrap CIs, verdict")
    sp.add_argument("--data", required=True, help="MVTec-AD-layout category; its data roles decide what is "
                                                  "learned from (reference) and what is scored (evaluation)")
    sp.add_argument("--synthetic", help="an export with synthetic/<type>/*.png + synthetic_ground_truth/ "
                                        "(+ provenance.jsonl, checked for descent from evaluation images)")
    from pipelines.registry import generator_names, get_info, picks_model
    in_mask = [n for n in generator_names("damage") if not get_info(n).full_image and not get_info(n).needs_model]
    per_product = ', '.join(n for n in in_mask if picks_model(n)) or '-'
    sp.add_argument("--generate", help="generate inside the protocol: NAME[,NAME…] or 'all' (those that run "
                                       f"here) of: {', '.join(in_mask)}; {per_product}: with the model "
                                       "picked per product and damage type (the workspace's trained runs, "
                                       "else the shipped one) unless --model names one; 'auto': per damage "
                                       "type the generator best on left-out reference defects (with 'all' "
                                       "when two or more can be chosen from)")
    sp.add_argument("--per-type", type=int, default=10, help="generated defects per damage type and repeat")
    sp.add_argument("--repeats", type=int, default=5, help="K repeats (seeds S..S+K-1)")
    sp.add_argument("--folds", type=int, default=None,
                    help="cross-fitting folds: every real defect is scored in one fold by models that did not "
                         "learn from it (default 3 when every type has ≥ 3 real defects, else 1 = the "
                         "product's roles)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--backbone", default="efficientnet_lite0")
    sp.add_argument("--coreset", type=float, default=None,
                    help="PatchCore normal-bank coreset fraction (default: PatchCore's, 0.05)")
    sp.add_argument("--positive-coreset", type=float, default=None,
                    help="PatchCore positive-bank coreset fraction (default: PatchCore's, 0.1)")
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--segmenter-steps", type=int, default=150)
    sp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws")
    sp.add_argument("--strength", type=float, default=0.8, help="generator strength ("
                    + ", ".join(n for n in in_mask if get_info(n).takes_strength) + ")")
    sp.add_argument("--model", help="pixel-inpaint model folder, used for the damage types it was trained for "
                                    "(default: picked per product and damage type: its environment variable, "
                                    "the workspace's newest trained run, the shipped model)")
    ws(sp)
    sp.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: fastest and reproducible on a shared 2-core machine; 0 = torch's)")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_experiment)



def _add_training_commands(sub, ws) -> None:
    """train (LoRA + damage embeddings, or pixel-inpaint)."""
    sp = sub.add_parser("train", help="train LoRA + damage embeddings (SD 1.5 inpainting) or the "
                                      "offline pixel-inpaint model")
    from pipelines.training.trainers import TRAINERS
    sp.add_argument("--kind", choices=list(TRAINERS), default="pixel-inpaint",
                    help="wall: wall-colour LoRA from a folder of photos + masks; controlnet: fine-tune a "
                         "ControlNet on the reference defects with their masks as the control image")
    sp.add_argument("--config", help="YAML file with the trainer's fields (unknown keys are an error)")
    sp.add_argument("--data", help="MVTec-layout category folder (real defects with masks)")
    sp.add_argument("--out", dest="output_dir", help="checkpoint folder")
    sp.add_argument("--model", help="lora: SD 1.5 inpainting folder or hub id (local files only); "
                                    "controlnet: SD 1.5 inpainting or base folder")
    sp.add_argument("--controlnet", help="controlnet: start from these ControlNet weights (a diffusers folder "
                                         "or a run folder; default: ControlNetModel.from_unet)")
    sp.add_argument("--damage-types", help="comma-separated (default: every type with samples)")
    sp.add_argument("--extra-data", help="accepted synthetic defects: an export, of which only synthetic/<type> "
                                         "+ synthetic_ground_truth/<type> (+ provenance.jsonl) are read")
    sp.add_argument("--steps", dest="max_steps", type=int)
    sp.add_argument("--minutes", type=float)
    sp.add_argument("--rank", type=int, help="lora rank")
    sp.add_argument("--lr", dest="learning_rate", type=float)
    sp.add_argument("--resolution", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--checkpoint-every", type=int)
    sp.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    sp.add_argument("--image-size", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    sp.add_argument("--cancel-file", help="stop cleanly (keeping a checkpoint) once this file exists")
    sp.add_argument("--progress-lines", action="store_true", help=argparse.SUPPRESS)
    sp.add_argument("--quiet", action="store_true")
    from studio.wall_cli import add_wall_ablation_command, add_wall_train_flags
    add_wall_train_flags(sp)
    sp.set_defaults(fn=cmd_train)
    add_wall_ablation_command(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="Defect Studio, headless.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def ws(sp):
        sp.add_argument("--workspace", help="workspace folder (default: $DEFECT_STUDIO_WORKSPACE or ./workspace)")
    _add_dataset_commands(sub, ws)
    _add_plan_commands(sub, ws)
    _add_generation_commands(sub, ws)
    _add_evaluation_commands(sub, ws)
    _add_training_commands(sub, ws)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ValueError as exc:  # StoreError, ImageInputError, MaskError, LayoutError … : user-facing
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, FileNotFoundError) as exc:  # unknown backbone / generator name, missing file
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
