"""Use cases shared by the UI, the CLI and the tests.

Each job has a request dataclass; services validate it, call pure code in ``pipelines`` and,
when a store is given, record the results with full provenance. Errors meant for the user are
``UserError`` (or subclasses of ValueError from pipelines) with a message that can be shown as-is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines import masks as M
from pipelines.imageio import ImageInputError, check_array
from pipelines.training import Cancelled, ProgressFn
from pipelines import registry
from pipelines.registry import AUTO, GENERATORS, get_generator, get_info
from studio.catalog import GOOD, Catalog



class UserError(ValueError):
    """A problem with the user's input; the message is shown in the UI / printed by the CLI."""


@dataclass
class GenerateRequest:
    """One click of "Generate": N candidates for one image + mask + (damage type | colour)."""
    image: np.ndarray                      # H×W×3 uint8 RGB
    mask: np.ndarray | None                # H×W (any binary-ish), None only for damage 'good'
    damage_type: str | None = None
    color: str | None = None               # '#RRGGBB' → wall-colour mode
    product: str = ""
    backend: str = "auto"                  # "auto" or a name of pipelines.registry.GENERATORS
    n: int = 4
    seed: int = 0
    feather: int = 4
    strength: float = 0.8
    source_image_id: int | None = None
    max_pixels: int = 40_000_000
    options: dict = field(default_factory=dict)  # backend-specific: model, controlnet, lora, steps, …
    batch_id: str | None = None                  # set by batch generation (plan item), for resume


@dataclass
class Candidate:
    image: np.ndarray
    mask: np.ndarray
    seed: int
    generator: str
    generator_version: str
    params: dict = field(default_factory=dict)
    sample_id: int | None = None
    ancestors: list = field(default_factory=list)   # pixel hashes of the real images it descends from


MAX_CANDIDATES = 16
MAX_SEED = 2**32 - 1        # numpy's seeds are non-negative; the store keeps 64-bit integers
MAX_FEATHER = 256


def resolve_backend(req: GenerateRequest, have_donors: bool) -> str:
    """The generator to run: the one asked for (its mode must fit the request), or for "auto" the
    first of :data:`pipelines.registry.AUTO` whose needs are met."""
    mode = "color" if req.color is not None else "damage"
    if req.backend == "auto":
        for name in AUTO[mode]:
            if not get_info(name).needs_donors or have_donors:
                return name
        raise UserError(f"no generator for {mode} can run here")
    info = get_info(req.backend)
    if info.mode != mode:
        raise UserError(f"backend {req.backend!r} is for {'wall colours' if info.mode == 'color' else 'defects'}; "
                        f"{'pick a damage type' if info.mode == 'damage' else 'pick a colour'} or another backend")
    return req.backend


# -- which model, when the request names none ------------------------------------------------
TRAINED_DIR = "adapters"     # <workspace>/adapters/<run>: where the Training tab writes its runs


def model_roots(workspace: str | Path | None) -> tuple[Path, ...]:
    """Folders of the workspace's own trained runs (searched before the shipped models)."""
    return (Path(workspace) / TRAINED_DIR,) if workspace else ()


def backend_status(name: str, product: str | None = None, workspace: str | Path | None = None
                   ) -> tuple[bool, str]:
    """``(ok, message)`` for backend ``name`` on ``product`` in this workspace (loads no weights):
    :func:`pipelines.registry.backend_status` with the workspace's trained runs."""
    return registry.backend_status(name, product or None, model_roots(workspace))


def available_backends(mode: str = "damage", product: str | None = None,
                       workspace: str | Path | None = None) -> list[str]:
    """Backends of ``mode`` that can run now for ``product`` (any product when None)."""
    return registry.offline_names(mode, product or None, model_roots(workspace))


def default_model(name: str, product: str | None, workspace: str | Path | None = None,
                  damage_type: str | None = None) -> str | None:
    """The model ``name`` runs with for ``product`` when none is named: the workspace's newest run
    trained for the product, else the model shipped for it (``assets/models/<product>/…``). With
    ``damage_type``, only a model trained for that type (never one that does not know it — the
    experiment's rule too: the one resolver is :func:`pipelines.registry.default_model`). None:
    none found, or the backend picks no model per product."""
    return registry.default_model(name, product or None, model_roots(workspace), damage_type)


_scored_cache: dict[tuple, object] = {}
_scored_lock = __import__("threading").Lock()


def _image_name(r: dict) -> str:
    src = Path(r.get("source_path") or "").name
    return f"image {r['id']} ({r['split']}/{r['label']}/{src})" if src else f"image {r['id']} ({r['split']}/{r['label']})"


def scored_set(store, product: str):
    """:class:`pipelines.guard.ScoredSet` of what an evaluation of ``product`` scores in the store:
    its evaluation defects + test/good images; cached by the set of image ids and hashes."""
    from pipelines.guard import ScoredSet
    from pipelines.roles import EVALUATION
    rows = store.list_images(product=product, origin="real", role=EVALUATION) + \
        store.list_images(product=product, split="test", label=GOOD)
    key = (str(getattr(store, "root", "")), product, tuple(sorted((r["id"], r["sha256"]) for r in rows)))
    with _scored_lock:
        hit = _scored_cache.get(key)
    if hit is None:
        hit = ScoredSet.from_images((_image_name(r), store.load_image(r["id"])) for r in rows)
        with _scored_lock:
            if len(_scored_cache) > 32:
                _scored_cache.clear()
            _scored_cache[key] = hit
    return hit


def guard_rows(store, product: str, rows: list[dict], images: list[np.ndarray], purpose: str) -> list[str]:
    """:func:`pipelines.guard.guard` on store images about to be copied / learned from (a copy of
    one of the product's scored images → :class:`UserError` naming both)."""
    from pipelines.guard import guard
    from pipelines.roles import LeakageError
    try:
        return guard(zip((_image_name(r) for r in rows), images), scored_set(store, product), purpose)
    except LeakageError as exc:
        raise UserError(str(exc)) from exc


def _donors(store, product: str, damage_type: str, limit: int = 16) -> list[dict]:
    """Cut-paste donors: the product's *reference* real defects of this type (never an
    evaluation image — see pipelines.roles; :func:`generate` passes the donor arrays it hands to a
    generator through :func:`pipelines.guard.guard`). Each: ``{"id", "sha256", "row", "pair": (image, mask)}``."""
    if store is None or not product:
        return []
    rows = store.reference_defects(product, damage_type)[:limit]
    return [{"id": r["id"], "sha256": r["sha256"], "row": r,
             "pair": (store.load_image(r["id"]), store.load_mask(r["id"]))} for r in rows]


def _goods(store, product: str, limit: int = 16) -> list[np.ndarray]:
    """The product's defect-free train images (for generators that register the target to a good
    image: ``info.needs_goods``); nothing that is scored (test images are never read here, and a
    copy of a scored image among the train images is refused by the guard)."""
    if store is None or not product:
        return []
    rows = store.list_images(product=product, label=GOOD, split="train")[:limit]
    images = [store.load_image(r["id"]) for r in rows]
    guard_rows(store, product, rows, images, "good images")
    return images


_shape_cache: dict[tuple, tuple] = {}
_shape_lock = __import__("threading").Lock()


def shape_model(store, product: str, damage_type: str):
    """``(model, foreground)`` for masks shaped like ``damage_type`` on ``product``: fitted on the
    product's *reference* masks of the type (pipelines.shapes), else the type's classic family;
    the foreground is estimated from its train/good images (None when there is no clear object,
    or when the references lie mostly off it). Cached until the reference set changes."""
    from pipelines import shapes
    refs = store.reference_defects(product, damage_type) if store is not None and product else []
    goods = [r for r in store.list_images(product=product, label=GOOD, split="train")][:40] \
        if store is not None and product else []
    key = (str(getattr(store, "root", "")), product, damage_type, tuple(r["id"] for r in refs), len(goods))
    with _shape_lock:
        if key in _shape_cache:
            return _shape_cache[key]
    fg = None
    if len(goods) >= 2:
        fg = shapes.estimate_foreground([store.load_image(r["id"]) for r in goods])
        fg = None if fg.all() else fg
    if refs:   # the masks fitted belong to reference defects: none may be a copy of a scored image
        guard_rows(store, product, refs, [store.load_image(r["id"]) for r in refs],
                   f"{damage_type} shape model")
    masks = [store.load_mask(r["id"]) for r in refs]
    fgs = [fg if fg is not None and fg.shape == m.shape else None for m in masks] if fg is not None else None
    model = shapes.shape_model_for(damage_type, masks, fgs)
    if getattr(model, "on_product", True) is False:
        fg = None
    with _shape_lock:
        _shape_cache[key] = (model, fg)
    return model, fg


def sample_mask(store, product: str, damage_type: str, shape: tuple[int, int],
                rng: np.random.Generator) -> np.ndarray:
    """A mask (``H×W`` uint8 0/255) shaped like ``damage_type`` on ``product`` (see :func:`shape_model`)."""
    import cv2
    model, fg = shape_model(store, product, damage_type)
    if fg is not None and fg.shape != tuple(shape[:2]):
        fg = cv2.resize(fg.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return model.sample(tuple(shape[:2]), rng, foreground=fg)


def _params(req: GenerateRequest, info, donors: list[dict]) -> dict:
    """The generator's parameters: the request's (feather, colour or damage type + strength,
    donors) and the options it declares (``info.options``) — nothing per backend name."""
    params: dict = {"feather": int(req.feather)}
    if req.color is not None:
        from pipelines.color import parse_hex
        try:
            params["color"] = parse_hex(req.color)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    else:
        params["damage_type"] = req.damage_type
        if info.takes_strength:
            params["strength"] = float(req.strength)
        if info.needs_donors:
            if not donors:
                raise UserError(
                    f"{info.name} needs at least one real '{req.damage_type}' defect with a mask for "
                    f"product '{req.product or '?'}' in the dataset with the role 'reference' (evaluation "
                    "images are never copied); use the 'perlin' backend, or give an image the reference "
                    "role in the Dataset tab")
            params["donors"] = [d["pair"] for d in donors]
        elif info.learns_from_donors and donors:
            params["donors"] = [d["pair"] for d in donors]
    for spec in info.option_specs:
        try:
            value = spec.parse(req.options.get(spec.name))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{info.name}: {exc}") from exc
        if value is not None:
            params[spec.name] = value
    return params


def generate(req: GenerateRequest, store=None, catalog: Catalog | None = None,
             progress: ProgressFn | None = None, cancelled: Callable[[], bool] | None = None,
             workspace: str | Path | None = None) -> list[Candidate]:
    """Make ``req.n`` candidates. With a store they are saved as samples of status 'candidate'.

    Pixels outside ``dilate(mask, feather)`` of every candidate equal the input exactly. A backend
    that picks its model per product (pixel-inpaint) and is given none runs with
    :func:`default_model` for ``req.product`` (trained runs of ``workspace``, default the store's).
    """
    image = _checked_request(req, catalog)
    if req.damage_type == GOOD:
        # A good sample has no mask and no generation: the source image *is* the sample.
        empty = np.zeros(image.shape[:2], np.uint8)
        cands = [Candidate(image.copy(), empty, int(req.seed), "none", "0", {"damage_type": GOOD})]
        return _record(req, store, cands)

    try:
        mask = M.validate_mask(req.mask if req.mask is not None else np.zeros(image.shape[:2], np.uint8),
                               image.shape)
    except M.MaskError as exc:
        raise UserError(str(exc)) from exc

    donors = _donors(store, req.product, req.damage_type) if req.damage_type else []
    root = workspace if workspace is not None else getattr(store, "root", None)
    try:
        chosen = _auto(req, store, root, progress, cancelled)
    except Cancelled:
        return []                                  # cancelled while choosing
    backend = chosen.generator if chosen is not None else resolve_backend(req, bool(donors))
    info, gen = get_info(backend), get_generator(backend)
    params = _params(req, info, donors)
    if params.get("donors"):      # the arrays copied / learned from: none may be a scored image's copy
        guard_rows(store, req.product, [d["row"] for d in donors], [d["pair"][0] for d in donors],
                   f"{backend} donors ({req.damage_type})")
    if info.needs_goods:
        params["goods"] = _goods(store, req.product)
    _pick_model(backend, params, req, root)
    ancestors = sorted({d["sha256"] for d in donors} if "donors" in params else set())
    ancestors = sorted(set(ancestors) | set(gen.ancestors(params)))
    recorded = _recorded(params, req, donors, info, chosen)

    cands: list[Candidate] = []
    for i in range(int(req.n)):
        if cancelled and cancelled():
            break
        seed = int(req.seed) + i
        try:
            out = gen(image, mask, seed=seed, **params)
        except (ValueError, TypeError) as exc:  # ModelError, MaskError, unknown option …
            raise UserError(str(exc)) from exc
        except Cancelled:
            break
        if not info.full_image:  # the paste-back contract, enforced, not assumed
            outside = M.dilate(mask, int(req.feather)) == 0
            if not np.array_equal(out[outside], image[outside]):
                raise RuntimeError(f"backend {backend} changed pixels outside the mask")
        cands.append(Candidate(out, mask, seed, backend, info.version, dict(recorded), ancestors=ancestors))
        if progress:
            progress((i + 1) / req.n, f"candidate {i + 1}/{req.n}")
    return _record(req, store, cands)


def _in_range(value, what: str, lo, hi, integer: bool = True) -> None:
    """A request number: finite, of the right kind and in ``lo..hi`` (:class:`UserError` naming it)."""
    import math
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value)) and lo <= value <= hi and (
            not integer or float(value) == int(value))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise UserError(f"{what} must be {'an integer' if integer else 'a number'} in {lo}..{hi}, got {value!r}")


def _checked_request(req: GenerateRequest, catalog: Catalog | None) -> np.ndarray:
    """The request's image as RGB uint8, once every field is checked (:class:`UserError` naming
    the first problem)."""
    try:
        image = check_array(req.image, req.max_pixels)
    except ImageInputError as exc:
        raise UserError(str(exc)) from exc
    if req.product:
        from studio.store_types import check_name
        try:
            check_name(req.product, "product")
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    if (req.damage_type is None) == (req.color is None):
        raise UserError("choose either a damage type or a wall colour (exactly one)")
    _in_range(req.n, "number of candidates", 1, MAX_CANDIDATES)
    _in_range(req.seed, "seed", 0, MAX_SEED)
    _in_range(req.feather, "feather", 0, MAX_FEATHER)
    _in_range(req.strength, "strength", 0.0, 1.0, integer=False)
    if req.damage_type is not None:
        catalog = catalog or Catalog()
        try:
            if req.product and set(catalog.damage_types(req.product)) - {GOOD}:
                catalog.check_damage(req.product, req.damage_type)
            else:
                catalog.check_any_damage(req.damage_type)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    if req.backend != "auto" and req.backend not in GENERATORS:
        raise UserError(f"unknown backend {req.backend!r}; known: auto, {', '.join(GENERATORS)}")
    return image


def _pick_model(backend: str, params: dict, req: GenerateRequest, root) -> None:
    """A backend that picks its model per product and is given none gets :func:`default_model`
    for the product and type; one whose model files are missing is a :class:`UserError` saying
    what to put where."""
    if not params.get("model") and registry.picks_model(backend):
        found = default_model(backend, req.product, root, req.damage_type)
        if found:
            params["model"] = found
        elif not req.product:
            raise UserError(f"{backend} picks its model by product: choose a product "
                            f"({registry.backend_status(backend)[1]}) or name a model (the 'model' option)")
        elif req.damage_type and default_model(backend, req.product, root):
            raise UserError(f"no {backend} model found for product {req.product!r} was trained for type "
                            f"{req.damage_type!r} (newest: {default_model(backend, req.product, root)}); train one "
                            f"that is: `python -m studio train --kind {backend} --data <{req.product} category "
                            f"folder> --damage-types {req.damage_type} --out <workspace>/adapters/<run>`, or name "
                            "a model (the 'model' option)")
    if not params.get("model"):
        ok, message = backend_status(backend, req.product, root)
        if not ok:
            raise UserError(message)


def _recorded(params: dict, req: GenerateRequest, donors: list[dict], info, chosen) -> dict:
    """The parameters a candidate records (no arrays: donor ids and counts instead; why auto chose)."""
    recorded = {k: v for k, v in params.items() if k not in ("donors", "goods")}
    if "color" in recorded:
        recorded["color"] = req.color
    if "donors" in params:
        recorded["n_donors"] = len(donors)
        recorded["donor_ids"] = [d["id"] for d in donors]
    if info.needs_goods:
        recorded["n_goods"] = len(params["goods"])
    if chosen is not None:
        recorded["auto"] = chosen.caption(req.product)
    return recorded


def _auto(req: GenerateRequest, store, workspace, progress, cancelled):
    """For ``backend="auto"`` on a product's damage type (a store and a workspace at hand): the
    generator chosen on the product's reference defects of the type (:mod:`studio.auto`, cached
    per product; the registry's fixed rule when there are fewer than 2). None: not an auto
    request of that kind. :class:`pipelines.training.Cancelled` when cancelled while choosing."""
    if req.backend != "auto" or not req.damage_type or store is None or not req.product or workspace is None:
        return None
    from pipelines.guard import guard
    from pipelines.roles import LeakageError
    from studio.auto import auto_choice

    def check(what: str, items: list) -> None:
        try:
            guard(items, scored_set(store, req.product), what)
        except LeakageError as exc:
            raise UserError(str(exc)) from exc
    return auto_choice(store, req.product, req.damage_type, workspace, check, progress, cancelled)


def _record(req: GenerateRequest, store, cands: list[Candidate]) -> list[Candidate]:
    if store is None:
        return cands
    product = req.product or "unsorted"
    for c in cands:
        c.sample_id = store.add_sample(
            product=product, image=c.image, mask=c.mask, source_image_id=req.source_image_id,
            damage_type=req.damage_type, color=req.color, generator=c.generator,
            generator_version=c.generator_version, params=c.params, seed=c.seed, status="candidate",
            batch_id=req.batch_id, ancestors=c.ancestors)
    return cands


def review(store, sample_id: int, decision: str, note: str | None = None) -> dict:
    """Accept or reject one candidate (or put it back to 'candidate')."""
    if decision not in ("accepted", "rejected", "candidate"):
        raise UserError(f"decision must be accepted, rejected or candidate, not {decision!r}")
    try:
        return store.set_status(int(sample_id), decision, note=note)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def bootstrap_demo(store, demo_dir: Path | None) -> dict:
    """Import the bundled demo categories on first start (an empty store)."""
    if demo_dir is None or not Path(demo_dir).is_dir() or store.products():
        return {}
    counts = {}
    for category in sorted(p for p in Path(demo_dir).iterdir() if (p / "train").is_dir()):
        counts[category.name] = store.import_mvtec(category)
    return counts


def request_summary(req: GenerateRequest) -> dict:
    d = asdict(req)
    d.pop("image"), d.pop("mask")
    return d


def learned_from(store, product: str, generator: str, damage_type: str | None,
                 params: dict | None = None) -> str:
    """What a candidate's generator learned from, in words, e.g. "cutpaste: copies from 6
    reference defects of broken_large" (donors and training data come only from reference images)."""
    params = params or {}
    if params.get("auto"):
        rest = learned_from(store, product, generator, damage_type, {k: v for k, v in params.items() if k != "auto"})
        return f"auto chose {params['auto']} · {rest}"
    if damage_type is None:
        return f"{generator}: recolours the mask to the chosen colour (learns from no image)"
    try:
        info = get_info(generator)
    except (KeyError, ValueError):
        return generator
    if info.needs_donors:
        n = params.get("n_donors")
        if n is None:
            n = len(store.reference_defects(product, damage_type)) if store is not None and product else 0
        return f"{generator}: copies from {n} reference defect{'s' * (n != 1)} of {damage_type}"
    if info.needs_model or params.get("model"):
        from pipelines.training_data import read_manifest
        model = params.get("model")
        if not model and generator == "pixel-inpaint" and product:
            from pipelines.pixel_inpaint import shipped_model
            model = shipped_model(product)
        manifest = read_manifest(model) if model else {}
        refs = manifest.get("reference") or []
        if refs:
            own = [r for r in refs if damage_type in Path(r).parts]
            where = Path(model)
            shown = f"{where.parent.name}/{where.name}" if where.name == "pixel-inpaint" else where.name
            return (f"{generator}: trained on {len(own)} reference defect{'s' * (len(own) != 1)} of "
                    f"{damage_type} ({len(refs)} of all types) — model {shown}")
        return f"{generator}: a trained model{f' ({Path(model).name})' if model else ''}; no training_data.json beside it"
    return f"{generator}: procedural, styled as {damage_type}; learns from no real defect"
