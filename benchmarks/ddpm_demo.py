"""The DDPM must-show run: train on a demo product's good images within a time budget, evaluate.

  python benchmarks/ddpm_demo.py --data assets/demo/bottle --out /tmp/ddpm_ckpt_bottle --minutes 20
  python benchmarks/ddpm_demo.py --data assets/demo/brushed_metal --no-rot90 --out /tmp/ddpm_ckpt_metal
  python benchmarks/ddpm_demo.py --data assets/demo/bottle --out /tmp/ddpm_ckpt_bottle --eval-only \
      --depths 100,200 --depths 150 --kind color
  # ε- vs v-prediction on the same step budget (one thread each, so both arms get the same work):
  OMP_NUM_THREADS=1 python benchmarks/ddpm_demo.py --data assets/demo/bottle --out /tmp/ddpm_eps \
      --prediction epsilon --steps 1500 --minutes 0 --depths 50 --depths 100,200

Training uses ``--train-data`` (default: ``--data``) train/good; evaluation always ``--data`` test.
Prints metrics per evaluation setting and writes them to OUT/eval.json. Checkpoints stay outside
the repository (weights are never committed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.ddpm import DDPMInspector, ModelConfig, TrainConfig, train_category  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="MVTec-layout category evaluated (test split)")
    ap.add_argument("--train-data", default=None, help="category whose train/good is used (default --data)")
    ap.add_argument("--out", required=True, help="checkpoint folder (outside the repo)")
    ap.add_argument("--minutes", type=float, default=20.0, help="time budget (0: --steps only)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--noise", default="gaussian", choices=["gaussian", "simplex"])
    ap.add_argument("--prediction", default="v", choices=["v", "epsilon"],
                    help="what the U-Net predicts (training target, scheduler, reconstruction)")
    ap.add_argument("--t-max", type=int, default=TrainConfig.t_max)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--no-rot90", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--depths", action="append", default=None, help="comma list; repeat for several settings")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--kind", action="append", default=None, help="color | ssim | color+ssim (repeatable)")
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is far faster than 2 when the cores are shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, args.threads))

    out = Path(args.out)
    if args.eval_only:
        insp = DDPMInspector.load(out)
    else:
        cfg = ModelConfig(size=args.size, crop=args.crop, preset=args.preset, noise=args.noise,
                          prediction=args.prediction)
        tcfg = TrainConfig(steps=args.steps, minutes=args.minutes or None, batch_size=args.batch_size, lr=args.lr,
                           t_max=args.t_max, rot90=not args.no_rot90)
        last = [0.0]

        def progress(frac: float, msg: str) -> None:
            if time.monotonic() - last[0] > 30 or frac >= 1.0:
                last[0] = time.monotonic()
                print(f"[train] {frac:5.1%} {msg}", flush=True)

        insp, res = train_category(args.train_data or args.data, out, cfg, tcfg, resume=args.resume,
                                   progress=progress)
        print(f"trained: {res.steps_this_run} steps this run, total {res.step}, {res.seconds / 60:.1f} min, "
              f"{res.steps_this_run / res.seconds:.2f} steps/s, last loss {res.loss:.4f} ({res.stopped})",
              flush=True)
    results = []
    eval_file = out / "eval.json"
    if eval_file.is_file():
        results = json.loads(eval_file.read_text())
    for depths in args.depths or ["50"]:
        ds = [int(d) for d in depths.split(",")]
        for kind in args.kind or ["color"]:
            r = insp.evaluate(args.data, depths=ds, seeds=list(range(args.seeds)), kind=kind, sigma=args.sigma)
            m = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.metrics.items()}
            m.update(kind=kind, seeds=args.seeds, sigma=args.sigma, step=insp.step, data=str(args.data),
                     prediction=insp.cfg.prediction)
            print(json.dumps(m), flush=True)
            results.append(m)
            eval_file.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
