"""``python -m studio`` generation commands: generate, generate-batch (their flags generated from
the generators' options)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.fileio import atomic_write_json
from studio.cli.workspace import open_store


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
    store = open_store(args) if args.record else None
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
    atomic_write_json(out / "provenance.json", meta, indent=1)
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
            atomic_write_json(target / "provenance.json",
                              {"image": str(img_path), "mask": str(mask_path), "process": state.process_index,
                               "candidates": [{"seed": c.seed, "generator": c.generator, "params": c.params}
                                              for c in cands]}, indent=1, default=str)
            print(f"[{state.process_index}] {img_path.name}: {len(cands)} candidate(s)")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 2 if failures else 0


def add_commands(sub, ws) -> None:
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
