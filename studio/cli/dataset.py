"""``python -m studio`` dataset commands: demo-data, import, export, samples, roles, runs, review."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from studio.cli.workspace import open_store


def cmd_demo_data(args) -> int:
    from pipelines.demo_data import write_demo_dataset
    counts = write_demo_dataset(Path(args.out), n_train_good=args.n_train, size=args.size, seed=args.seed)
    print(json.dumps(counts, indent=1))
    return 0


def cmd_import(args) -> int:
    store = open_store(args)
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


def cmd_export(args) -> int:
    store = open_store(args)
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
    store = open_store(args)
    rows = store.list_samples(product=args.product, status=args.status, limit=args.limit)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("id", "product", "damage_type", "color", "generator",
                                            "seed", "status", "note", "created_at")}, default=str))
    return 0


def cmd_review(args) -> int:
    from studio.services import UserError, review
    store = open_store(args)
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
    store = open_store(args)
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


def add_commands(sub, ws) -> None:
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
