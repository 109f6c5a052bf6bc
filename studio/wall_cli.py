"""CLI pieces of the wall-colour protocol (:mod:`pipelines.wall_train`), kept out of
``studio/__main__.py``: the ``train --kind wall`` flags and the ``wall-ablation`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# config keys set by the wall flags of `train` (argparse dest = WallTrainConfig field)
WALL_FLAGS = ("masks", "random_color_prob", "reference", "ip_adapter", "wall_color_method",
              "color_loss_weight", "wall_erode_px", "wall_min_quality", "validate_every",
              "validation_colors")


def add_wall_train_flags(sp: argparse.ArgumentParser) -> None:
    """The ``--kind wall`` flags of ``python -m studio train`` (None = the config's default)."""
    g = sp.add_argument_group("wall colour (--kind wall: --data is a folder of photos + masks)")
    g.add_argument("--masks", help="wall: masks folder (default DATA/masks, or <stem>_mask.png beside the photos)")
    g.add_argument("--random-color-prob", dest="random_color_prob", type=float,
                   help="wall: share of samples recoloured to a random colour (default 0.3)")
    g.add_argument("--reference", choices=["auto", "ip-adapter", "none"],
                   help="wall: colour reference through IP-Adapter (auto: when its weights are found)")
    g.add_argument("--ip-adapter", dest="ip_adapter", help="wall: IP-Adapter folder (default $DEFECT_STUDIO_IP_ADAPTER)")
    g.add_argument("--color-method", dest="wall_color_method", choices=["median", "mean", "kmeans"],
                   help="wall: how a mask's dominant colour is measured (default median)")
    g.add_argument("--color-loss-weight", dest="color_loss_weight", type=float,
                   help="wall: LAB colour-consistency loss weight (default 0)")
    g.add_argument("--erode", dest="wall_erode_px", type=float, help="wall: mask erosion in px (default 5)")
    g.add_argument("--min-quality", dest="wall_min_quality", type=float,
                   help="wall: keep a sample when this share of its mask grades good (default 0.6)")
    g.add_argument("--validate-every", dest="validate_every", type=int,
                   help="validation grid (+ wall colour metrics) every N steps; 0: none")
    g.add_argument("--validation-colors", dest="validation_colors",
                   help="wall: comma-separated #RRGGBB targets of the validation rows (default: each wall's own)")


def cmd_wall_ablation(args) -> int:
    from pipelines.wall_train import (ABLATIONS, WallTrainConfig, ablation_table, run_ablation,
                                      wall_samples_from_folder)
    from studio.cli.progress import tqdm_progress
    overrides = {k: getattr(args, k) for k in ("model", "resolution", "batch_size", "validation_colors",
                                               "seed", "masks") if getattr(args, k, None) is not None}
    cfg = WallTrainConfig.from_dict({}, output_dir=str(Path(args.out) / "_base"), max_steps=args.steps,
                                    data=args.data, validation_steps=args.validation_steps,
                                    checkpoint_every=args.steps, log_every=1, **overrides)
    samples = wall_samples_from_folder(args.data, args.masks, args.image_size)
    variants = [v for v in (args.variants or "").split(",") if v] or list(ABLATIONS)
    bar, progress = tqdm_progress("wall ablation", args.quiet)
    try:
        table = run_ablation(cfg, samples, args.out, variants, progress)
    except RuntimeError as exc:    # cancelled, checkpoint errors: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        bar.close()
    print(ablation_table(table))
    notes = sorted({n for r in table for n in r["notes"]})
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'ablation.md'} and ablation.json")
    return 0


def add_wall_ablation_command(sub) -> None:
    from pipelines.wall import ABLATIONS
    sp = sub.add_parser("wall-ablation", help="wall colour: train the baseline and the four ablations "
                                              "(k-means colour, colour loss, texture, unconditional) → a table")
    sp.add_argument("--data", required=True, help="folder of wall photos + masks (images/ + masks/)")
    sp.add_argument("--masks", help="masks folder (default DATA/masks)")
    sp.add_argument("--out", required=True, help="output folder (one run per variant, ablation.md/json)")
    sp.add_argument("--model", help="SD 1.5 inpainting folder (default $DEFECT_STUDIO_SD_INPAINT)")
    sp.add_argument("--steps", type=int, default=50, help="training steps per variant (default 50)")
    sp.add_argument("--resolution", type=int, help="training crop size (default 512)")
    sp.add_argument("--batch-size", dest="batch_size", type=int)
    sp.add_argument("--image-size", dest="image_size", type=int, help="resize photos' long side to this")
    sp.add_argument("--validation-steps", dest="validation_steps", type=int, default=20,
                    help="denoising steps of each validation image (default 20)")
    sp.add_argument("--validation-colors", dest="validation_colors",
                    help="comma-separated #RRGGBB targets (default: each wall's own colour)")
    sp.add_argument("--variants", help=f"comma-separated subset of {','.join(ABLATIONS)} (default: all)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_wall_ablation)
