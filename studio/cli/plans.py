"""``python -m studio plan make | run | status``: the Curation tab's balancing plan, headless."""
from __future__ import annotations

import json

from studio.cli.progress import tqdm_progress
from studio.cli.workspace import open_store


def _print_monitor(monitor: dict) -> None:
    from studio.curation import monitor_lines
    for line in monitor_lines(monitor):
        print(line)


def cmd_plan_make(args) -> int:
    from studio.curation import CurationDB, make_plan
    store = open_store(args)
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
    store = open_store(args)
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
    store = open_store(args)
    st = plan_status(CurationDB(store.root), args.id)
    print(json.dumps({k: st[k] for k in ("plan_id", "product", "done", "pending", "total", "params")}))
    _print_monitor(st["monitor"])
    return 0


def add_commands(sub, ws) -> None:
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
