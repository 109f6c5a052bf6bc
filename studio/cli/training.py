"""``python -m studio train`` (the ``--kind`` trainers) and ``wall-ablation``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.cli.progress import tqdm_progress

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


def add_commands(sub, ws) -> None:
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
