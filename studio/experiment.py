""""Did synthetic data help?" — the studio's measuring stick.

Protocol (``python -m studio experiment``, the Curation tab's Experiment step):

* **Roles.** Real defect images of ``--data`` are ``reference`` (may be learned from / copied)
  or ``evaluation`` (only scored), from :func:`pipelines.roles.category_roles`. Everything is
  scored on ``roles.scored`` = evaluation defects + ``test/good``; nothing learns from them.
* **Synthetic defects** come from an export (``--synthetic DIR``: ``synthetic/<type>/*.png`` +
  ``synthetic_ground_truth/``; refused, naming the sample, when its ``provenance.jsonl`` says it
  descends from an evaluation image or its pixels equal one) and/or are made inside the protocol
  (``--generate perlin,cutpaste|all --per-type N``): N per damage type on ``train/good`` images,
  with masks from the studio's shape model fitted on that type's reference masks only
  (:class:`MaskSampler`: :mod:`pipelines.shapes`, kept on the product foreground estimated from
  ``train/good``); cut-paste donors are that type's reference defects only. Every generator gets
  the same base images, masks and seeds, so they are compared on equal terms. A generator that
  picks its model per product (pixel-inpaint) runs, unless ``--model`` names one, with the model
  the registry finds for the product (the data folder's name) *and each damage type*: the
  workspace's newest trained run (``<workspace>/adapters``), else the shipped one
  (``assets/models/<product>/…``); a type no model was trained for is skipped, with a note. Each
  model's training data (``training_data.json``) is checked against the evaluation images, and
  ``metrics.json`` → ``generators`` records which model folder made which type.
* **Arm A — PatchCore, dual bank.** The normal bank is fitted on ``train/good`` once per repeat
  and reused; only the positive bank changes (``fit_positive`` replaces it): reference real
  defect crops only vs reference + synthetic.
* **Arm B — supervised segmenter** (:mod:`pipelines.segmenter`, the downstream test of DRAEM /
  AnomalyDiffusion): trained on synthetic only, reference real defects only, and both; each
  training set also holds every ``train/good`` image with an empty mask.
* **Repeats.** ``K`` repeats (default 5); repeat ``k`` uses seed ``S + k`` for the coreset, the
  segmenter's initialisation and batches, and the generation (base images, masks, generator
  seeds). The role split never changes.
* **Statistics** (:mod:`pipelines.stats`). Every metric (pixel AUROC, pixel AP, AUPRO, image
  AUROC) and every delta is ``{"mean", "ci95"}``: the mean over the repeats, and a 95 % paired,
  stratified bootstrap interval over the evaluation images. A verdict — ``helped`` / ``no
  detectable effect`` / ``hurt`` — comes only from a delta's interval (entirely above 0 /
  containing 0 / entirely below 0). The headline uses :data:`PRIMARY_METRIC` (pixel AP: threshold
  free and sensitive to the few defect pixels; pixel AUROC saturates near 1).

Outputs in ``--out``: ``metrics.json`` (blocks described in :func:`run_experiment`), ``report.md``,
``figure.html`` (plotly, error bars; ``figure.png`` too when kaleido is installed) and
``samples/<generator>.png`` (a few synthetic defects of the first repeat, mask outlined).
Deterministic: two runs with the same inputs write the same numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipelines import roles as R
from pipelines.fileio import atomic_write_json, atomic_write_text
from pipelines.stats import METRICS, compare, verdict
from pipelines.training import CancelFn, Cancelled, ProgressFn, check_cancelled

METRIC_KEYS = METRICS                       # pixel_auroc, pixel_ap, aupro, image_auroc
PRIMARY_METRIC = "pixel_ap"


@dataclass
class ExperimentRequest:
    data: str                               # MVTec-AD-layout category (roles decide what is scored)
    out: str
    synthetic: str | None = None            # an export: synthetic/<type> + synthetic_ground_truth/
    generate: str | Sequence[str] | None = None   # "perlin,cutpaste" | "all" | a list of names
    per_type: int = 10                      # synthetic defects per damage type and repeat
    repeats: int = 5
    seed: int = 0
    backbone: str = "efficientnet_lite0"
    coreset: float | None = None            # None: PatchCore's default
    positive_coreset: float | None = None   # positive bank's coreset; None: PatchCore's default (10 %)
    size: int = 256
    segmenter_steps: int = 150
    n_boot: int = 1000
    strength: float = 0.8                   # generator strength (perlin, cutpaste)
    feather: int = 4
    model: str | None = None                # pixel-inpaint model folder for every type (else picked per type)
    workspace: str | None = None            # its adapters/ runs come before the shipped models
                                            # (None: the studio's, $DEFECT_STUDIO_WORKSPACE or ./workspace)
    threads: int = 1                        # torch threads while it runs (0: leave torch's setting)
    folds: int | None = None                # (the package version cross-fits; this module ignores it)

    def validate(self) -> None:
        if not self.synthetic and not self.generate:
            raise ValueError("nothing to compare: give --synthetic EXPORT_DIR and/or --generate "
                             "NAME[,NAME…]|all (e.g. perlin,cutpaste)")
        if not 1 <= int(self.repeats) <= 50:
            raise ValueError(f"repeats must be 1..50, got {self.repeats}")
        if self.generate and not 1 <= int(self.per_type) <= 500:
            raise ValueError(f"per-type must be 1..500, got {self.per_type}")
        if not 32 <= int(self.size) <= 1024:
            raise ValueError(f"size must be 32..1024 px, got {self.size}")
        if self.coreset is not None and not 0 < float(self.coreset) <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {self.coreset}")
        if self.positive_coreset is not None and not 0 < float(self.positive_coreset) <= 1:
            raise ValueError(f"positive coreset must be a fraction in (0, 1], got {self.positive_coreset}")
        if int(self.threads) < 0:
            raise ValueError(f"threads must be ≥ 0 (0: torch's default), got {self.threads}")
        if int(self.segmenter_steps) < 1 or int(self.n_boot) < 100:
            raise ValueError("segmenter steps must be ≥ 1 and bootstrap draws ≥ 100")

    @property
    def product(self) -> str:
        """The product the data is of: the data folder's name (as a trained run's product is the
        name of the folder it was trained on)."""
        return Path(self.data).expanduser().resolve().name

    def model_roots(self) -> tuple[Path, ...]:
        """Folders of the workspace's trained runs (:func:`studio.services.model_roots`; the
        workspace as every CLI command finds it, :meth:`studio.config.Settings.from_env`)."""
        from studio.config import Settings
        from studio.services import model_roots
        return model_roots(Settings.from_env(workspace=self.workspace).workspace)

    def generator_names(self) -> list[str]:
        g = self.generate
        if not g:
            return []
        items = [s.strip() for s in (g.split(",") if isinstance(g, str) else g) if s and s.strip()]
        return list(dict.fromkeys(items))


@dataclass
class Synthetic:
    """One synthetic defect: image ``[S x S x 3]`` uint8, mask ``[S x S]`` bool, and where it came from."""
    image: np.ndarray
    mask: np.ndarray
    label: str
    name: str                                # file (export) or generator/repeat/type/index
    sha: str                                 # pixel hash of the image
    ancestors: list[str] = field(default_factory=list)   # hashes of the real images it derives from


# ------------------------------------------------------------------------------------------------
# Mask shapes: the studio's shape model (pipelines.shapes), fitted on reference masks only


@dataclass
class MaskSampler:
    """Masks shaped like one damage type's *reference* masks, on the product: a
    :func:`pipelines.shapes.shape_model_for` fitted on them (the model the Curation batch uses),
    sampled inside the foreground :func:`pipelines.shapes.estimate_foreground` finds on
    train/good — or without one when the references mostly lie off it (``on_product``)."""
    model: object
    foreground: np.ndarray | None

    @classmethod
    def fit(cls, damage_type: str, ref_masks: Sequence[np.ndarray], foreground: np.ndarray | None
            ) -> "MaskSampler":
        from pipelines import shapes
        fg = None if foreground is None or foreground.all() else foreground
        model = shapes.shape_model_for(damage_type, [np.asarray(m) > 0 for m in ref_masks], fg)
        return cls(model, fg if getattr(model, "on_product", True) else None)

    def sample(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """``[H x W]`` bool, never empty."""
        return self.model.sample(shape, rng, foreground=self.foreground) > 0


# ------------------------------------------------------------------------------------------------
# Sources of synthetic defects


def _hash_list(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _provenance_ancestors(folder: Path) -> dict[str, list[str]]:
    """``provenance.jsonl`` of an export → ``{file (relative): ancestor hashes}`` from the keys
    ``descends_from``, ``source_sha256``, ``donor_sha256`` and ``source_image.sha256``."""
    out: dict[str, list[str]] = {}
    prov = folder / "provenance.jsonl"
    if not prov.is_file():
        return out
    for n, line in enumerate(prov.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{prov} line {n} is not JSON ({exc}); re-export the synthetic set") from None
        anc = (_hash_list(rec.get("descends_from")) + _hash_list(rec.get("source_sha256"))
               + _hash_list(rec.get("donor_sha256")))
        src = rec.get("source_image")
        if isinstance(src, dict):
            anc += _hash_list(src.get("sha256"))
        if rec.get("file"):
            out[str(rec["file"])] = sorted(set(anc))
    return out


def load_export(folder: str | Path, size: int, roles: R.CategoryRoles) -> list[Synthetic]:
    """The accepted synthetic defects of an export, checked against the evaluation images:
    a sample whose pixels equal an evaluation image, or whose provenance names one as an
    ancestor, is refused (:class:`pipelines.roles.LeakageError`, naming it)."""
    from pipelines.mvtec import load_image
    from pipelines.imageio import read_mask
    folder = Path(folder)
    files = sorted((folder / "synthetic").glob("*/*.png")) if (folder / "synthetic").is_dir() else []
    if not files:
        raise ValueError(f"{folder} holds no accepted synthetic samples (synthetic/<type>/*.png) — accept "
                         "some candidates first, then export")
    ancestry = _provenance_ancestors(folder)
    by_hash = {roles.hashes[s.path]: roles.rel([s])[0] for s in roles.evaluation}
    out: list[Synthetic] = []
    for f in files:
        rel = str(f.relative_to(folder))
        mask_file = folder / "synthetic_ground_truth" / f.parent.name / f"{f.stem}_mask.png"
        if not mask_file.is_file():
            continue
        sha = R.file_pixel_hash(f)
        if sha in by_hash:
            raise R.LeakageError(f"synthetic sample {rel} is pixel-identical to evaluation image "
                                 f"{by_hash[sha]}: it cannot be trained on while that image is scored")
        m = read_mask(mask_file)
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0 if m.shape != (size, size) else m > 0
        if not m.any():
            continue
        out.append(Synthetic(load_image(f, size), m, f.parent.name, rel, sha, ancestry.get(rel, [])))
    if not out:
        raise ValueError(f"{folder} holds no accepted synthetic samples with masks "
                         "(synthetic_ground_truth/<type>/NNN_mask.png)")
    R.check_descent([(s.name, s.ancestors) for s in out], roles.evaluation_hashes)
    return out


@dataclass
class GeneratorPlan:
    name: str
    generator: object
    info: object                                          # pipelines.generator.GeneratorInfo
    params: dict = field(default_factory=dict)            # options passed on every call
    ancestors: list[str] = field(default_factory=list)    # what the generator itself learned from
    models: dict[str, str] = field(default_factory=dict)  # damage type -> model folder it runs with
    model_ancestors: dict[str, list[str]] = field(default_factory=dict)   # model folder -> its training data
    skipped_types: dict[str, str] = field(default_factory=dict)           # damage type -> why none is made
    model_sources: dict[str, str] = field(default_factory=dict)           # model folder -> where it was found

    def provenance(self) -> dict:
        """What metrics.json records of the generator: version, the model folder per damage type
        (and where it was found: ``--model``, the env variable, a workspace run, shipped), how many
        real images each model learned from, and the types it made nothing for, with the reason."""
        return {"version": self.info.version,
                "models": dict(sorted(self.models.items())) or None,
                "model_sources": dict(sorted(self.model_sources.items())) or None,
                "model_training_images": {m: len(a) for m, a in sorted(self.model_ancestors.items())} or None,
                "skipped_types": dict(sorted(self.skipped_types.items()))}


def experiment_generators(product: str | None = None, roots: Sequence[str | Path] = ()) -> list[str]:
    """What ``--generate all`` means: every damage generator of the registry that runs here
    offline — no hub weights (``info.needs_model``), in-mask (not ``full_image``), available now
    (for ``product`` when given: a data-trained one such as pixel-inpaint only when a model for the
    product is found, in ``roots`` — the workspace's trained runs — or shipped)."""
    from pipelines.registry import get_info, offline_names
    return [n for n in offline_names("damage", product, roots)
            if not get_info(n).needs_model and not get_info(n).full_image]


SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"   # <product>/<generator>/


def _model_source(folder: str, roots: Sequence[str | Path], given: str | None) -> str:
    """Where a model folder came from, for the report: ``--model``, a workspace run (under
    ``roots``), shipped (``assets/models``), else the environment variable (the registry's lookup
    order has no other source)."""
    if given and folder == str(given):
        return "--model"
    f = Path(folder).expanduser().resolve()
    if any(f.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
        return "workspace run"
    return "shipped" if f.is_relative_to(SHIPPED_MODELS) else "environment variable"


def pick_models(name: str, product: str | None, roots: Sequence[str | Path], types: Sequence[str]
                ) -> tuple[dict[str, str], dict[str, str]]:
    """For a generator that picks its model per product (:func:`pipelines.registry.picks_model`):
    ``({type: model folder}, {type: why none})`` — per damage type, the model
    :func:`pipelines.registry.default_model` picks *for that type* (the environment variable, then
    the product's newest trained run in ``roots``, then the shipped model; one that was not
    trained for the type is never used for it)."""
    from pipelines.registry import backend_status, default_model
    models, missing = {}, {}
    any_model = default_model(name, product, roots) if product else None
    for t in types:
        found = default_model(name, product, roots, t) if product else None
        if found:
            models[t] = found
        elif any_model is None:
            missing[t] = backend_status(name, product, roots)[1] if product else \
                f"{name} picks its model by product and the data folder names none"
        else:
            missing[t] = (f"no {name} model found for product {product!r} was trained for type {t!r} "
                          f"(newest: {any_model}); train one that is: `python -m studio train --kind {name} "
                          f"--data <{product} category folder> --damage-types {t} --out <workspace>/adapters/<run>`")
    return models, missing


def resolve_generators(names: Sequence[str], model: str | None, roles: R.CategoryRoles,
                       notes: list[str], product: str | None = None,
                       roots: Sequence[str | Path] = ()) -> list[GeneratorPlan]:
    """Generator names (``all`` = :func:`experiment_generators`) → ready generators. A generator
    that learned from data (``info.learns_from_data``) must say what it learned from
    (``ancestors``: its model's ``training_data.json``), and none of it may be an evaluation
    image (:class:`pipelines.roles.LeakageError` otherwise, naming the model folder). A generator
    that picks its model per product (pixel-inpaint) and is given no ``model`` runs, per damage
    type with reference defects, with the model :func:`pick_models` finds for ``product`` in
    ``roots`` (the workspace's runs) or shipped; a type no model was trained for is skipped, with a
    note. A ``model`` given (``--model``) runs for the types it was trained for
    (:func:`pipelines.registry.model_types`); the others are skipped with a note, never run with a
    model that does not know them. A name given explicitly that cannot run at all is an error;
    under ``all`` it is a note."""
    from pipelines.registry import (GENERATORS, backend_status, get_generator, get_info, model_types,
                                    picks_model)
    explicit = [n for n in names if n != "all"]
    types = sorted({s.label for s in roles.reference})
    wanted = []
    if "all" in names:
        wanted = experiment_generators(product, roots)
        if model and "pixel-inpaint" in GENERATORS and "pixel-inpaint" not in wanted:
            wanted.append("pixel-inpaint")          # a model given on the command line
        skipped = [n for n in GENERATORS if get_info(n).mode == "damage" and n not in wanted
                   and not get_info(n).needs_model and not get_info(n).full_image]
        for n in skipped:
            notes.append(f"skipped {n}: {backend_status(n, product, roots)[1]}"
                         + (_run_hint(n, product, roots) if picks_model(n) else ""))
    wanted += [n for n in explicit if n not in wanted]
    plans = []
    for name in wanted:
        info = get_info(name)                  # KeyError listing the known names
        if info.mode != "damage" or info.full_image:
            raise ValueError(f"generator {name!r} does not make a defect inside a mask; the experiment "
                             f"can generate with: {', '.join(experiment_generators())}")
        gen = get_generator(name)
        takes_model = any(s.name == "model" for s in info.option_specs)
        plan = GeneratorPlan(name, gen, info)
        problem = None
        if model and takes_model:
            known = model_types(name, model) if picks_model(name) else None
            plan.models = {t: str(model) for t in types if known is None or t in known}
            plan.skipped_types = {
                t: (f"the model {model} was not trained for type {t!r} (it knows {', '.join(known) or 'none'}); "
                    f"train one that is: `python -m studio train --kind {name} --data <category folder> "
                    f"--damage-types {t} --out <run>`") for t in types if known is not None and t not in known}
            if not plan.models:
                problem = "; ".join(dict.fromkeys(plan.skipped_types.values())) or "no damage type to generate"
        elif takes_model and picks_model(name):
            plan.models, plan.skipped_types = pick_models(name, product, roots, types)
            if not plan.models:
                problem = "; ".join(dict.fromkeys(plan.skipped_types.values())) or "no damage type to generate"
        else:
            ok, msg = gen.available()
            problem = None if ok else msg
        if problem is None and not plan.models:
            plan.ancestors = list(gen.ancestors({})) if hasattr(gen, "ancestors") else []
            if info.learns_from_data and not plan.ancestors:
                problem = _NO_MANIFEST
        for folder in list(dict.fromkeys(plan.models.values())) if problem is None else []:
            anc = list(gen.ancestors({"model": folder})) if hasattr(gen, "ancestors") else []
            if info.learns_from_data and not anc:      # its types are not made with another model
                for t in [t for t, f in plan.models.items() if f == folder]:
                    plan.skipped_types[t] = f"its model {folder}: {_NO_MANIFEST}"
                    del plan.models[t]
                continue
            R.check_descent([(f"generator {name} (the training data of its model {folder})", anc)],
                            roles.evaluation_hashes)
            plan.model_ancestors[folder] = sorted(set(anc))
            plan.model_sources[folder] = _model_source(folder, roots, model)
        if problem is None and plan.skipped_types and not plan.models:
            problem = "; ".join(dict.fromkeys(plan.skipped_types.values()))
        if problem:
            if name in explicit:
                raise ValueError(f"generator {name}: {problem}")
            notes.append(f"skipped {name}: {problem}")
            continue
        if not plan.models:
            R.check_descent([(f"generator {name} (its training data)", plan.ancestors)], roles.evaluation_hashes)
        else:
            by_folder: dict[str, list[str]] = {}
            for t, f in sorted(plan.models.items()):
                by_folder.setdefault(f, []).append(t)
            notes.append(f"{name}: " + "; ".join(f"{', '.join(ts)} with the model {f} ({plan.model_sources[f]})"
                                                for f, ts in by_folder.items())
                         + "".join(f"; type {t} skipped: {why}" for t, why in sorted(plan.skipped_types.items())))
        plans.append(plan)
    return plans


def _run_hint(name: str, product: str | None, roots: Sequence[str | Path]) -> str:
    where = f"{Path(roots[0]) / '<run>'}" if roots else "<workspace>/adapters/<run>"
    return (f"; for the experiment: --model <folder>, or train into {where} from a category folder named "
            f"{product or '<product>'!r} and it is picked up")


_NO_MANIFEST = ("its model lists no training data (training_data.json), so what it learned from cannot be "
                "checked against the evaluation images; retrain it with `python -m studio train`")


def synthesize(plan: GeneratorPlan, train: Sequence[np.ndarray], train_hashes: Sequence[str],
               reference: dict[str, list[tuple[np.ndarray, np.ndarray, str]]],
               masks: dict[str, MaskSampler], per_type: int, seed: int, repeat: int, strength: float,
               feather: int, cancelled: CancelFn | None = None) -> list[Synthetic]:
    """``per_type`` synthetic defects per damage type with reference defects (``reference``:
    type → [(image, mask, pixel hash)]). The base image, mask and generator seed of item ``i``
    of type ``t`` depend only on ``(seed, repeat, t, i)``, never on the generator. Parameters as
    :func:`studio.services.generate` passes them: feather, damage type, strength when the
    generator takes it, donors (that type's reference defects only) when it needs them."""
    out: list[Synthetic] = []
    for t in sorted(reference):
        if t in plan.skipped_types or (plan.models and t not in plan.models):
            continue                            # no model trained for the type: nothing is made
        refs = reference[t]
        type_key = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
        model = plan.models.get(t)
        params: dict = {"feather": int(feather), "damage_type": t, **plan.params,
                        **({"model": model} if model else {})}
        # the mask shapes come from every reference mask of the type: all are ancestors
        ancestors = [*plan.ancestors, *plan.model_ancestors.get(model, []), *(h for _, _, h in refs)]
        if plan.info.takes_strength:
            params["strength"] = float(strength)
        if plan.info.takes_donors:
            params["donors"] = [(img, m.astype(np.uint8) * 255) for img, m, _ in refs]
        if getattr(plan.info, "needs_goods", False):
            params["goods"] = list(train)
        for i in range(per_type):
            check_cancelled(cancelled, "experiment")
            rng = np.random.default_rng([int(seed), int(repeat), type_key, i])
            base = int(rng.integers(len(train)))
            mask = masks[t].sample(train[base].shape[:2], rng)
            gen_seed = int(rng.integers(2 ** 31 - 1))
            img = np.ascontiguousarray(plan.generator(train[base], mask.astype(np.uint8) * 255,
                                                      seed=gen_seed, **params))
            out.append(Synthetic(img, mask, t, f"{plan.name}/r{repeat}/{t}/{i:03d}", R.pixel_hash(img),
                                 sorted({train_hashes[base], *ancestors})))
    return out


# ------------------------------------------------------------------------------------------------
# The protocol


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "timm", "scikit-learn", "numpy", "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _deterministic(threads: int):
    """Deterministic torch kernels and a fixed number of torch threads for the duration (the
    previous settings are restored; both are process-wide, so a concurrent job in the same
    process runs with them too).

    One thread by default: the protocol is mostly small ops (coreset steps, a tiny decoder), and
    on a shared 2-core machine with other work running, two threads spent most of their time
    waiting for each other — PatchCore's fit on transistor took 10 s with one thread vs 56 s with
    two, a segmenter step 11 ms vs 287 ms. A fixed count also keeps the floating-point summation
    order, hence the numbers, the same on machines with other core counts."""
    import torch
    before = torch.are_deterministic_algorithms_enabled()
    n_before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(n_before)


@contextlib.contextmanager
def _as_cancelled(*kinds: type):
    """Re-raise another module's cancel exception as the one :class:`pipelines.training.Cancelled`."""
    try:
        yield
    except Cancelled:
        raise
    except kinds as exc:
        raise Cancelled(str(exc)) from exc


def _check_training_set(name: str, hashes: set[str], evaluation: set[str]) -> None:
    leak = hashes & evaluation
    if leak:
        raise R.LeakageError(f"the {name} training set holds {len(leak)} evaluation image(s) "
                             f"({sorted(leak)[0][:12]}…); refusing to run")


def run_experiment(req: ExperimentRequest, progress: ProgressFn | None = None,
                   cancelled: CancelFn | None = None) -> dict:
    """Run the protocol of the module docstring; write ``metrics.json``, ``report.md`` and the
    figure to ``req.out``; return the metrics dict.

    Blocks: ``protocol`` (evaluation / reference / scored paths relative to ``--data``, repeats,
    seed), ``patchcore`` {reference_only, reference_plus_synthetic, delta}, ``segmenter``
    {synthetic_only, reference_only, reference_plus_synthetic, delta, delta_synthetic_only} —
    every metric ``{"mean", "ci95"}`` (deltas add ``verdict``) — ``verdict``, with ``--generate``
    ``backends`` {name: {patchcore, segmenter, verdict}}; the top-level blocks refer to
    ``--synthetic`` if given, else to the first generator. ``real_only`` / ``with_synthetic`` /
    ``delta`` hold arm A's means (backward compatible). ``training_hashes`` lists the pixel hashes
    of every image any model was trained on (no evaluation image is ever among them)."""
    import torch

    from pipelines.backbones import build_backbone
    from pipelines.patchcore import Cancelled as PatchCoreCancelled
    from pipelines.segmenter import FeatureCache

    req.validate()
    t_start = time.perf_counter()
    say = progress or (lambda f, m="": None)
    d = _load_protocol(req, say)
    run = _Runs(req, d, say, cancelled)
    with _deterministic(int(req.threads)), torch.random.fork_rng(devices=[]), _as_cancelled(PatchCoreCancelled):
        torch.manual_seed(int(req.seed))
        run.features(FeatureCache(build_backbone(req.backbone)))
        for k in range(int(req.repeats)):
            run.repeat(k)
    _check_training_set("segmenter", run.hashes["segmenter"], d.evaluation_hashes)
    _check_training_set("PatchCore positive bank", run.hashes["patchcore_positive_bank"], d.evaluation_hashes)
    say(0.95, f"bootstrap ({req.n_boot} draws)")
    result = _result(req, d, run, _blocks(req, d.sources, run), t_start)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_samples(out, run.examples)
    atomic_write_json(out / "metrics.json", result, indent=1)
    atomic_write_text(out / "report.md", report_markdown(result))
    write_figure(result, out)
    say(1.0, "done")
    return result


@dataclass
class _Protocol:
    """The data of one experiment: roles, loaded images, what is scored, the synthetic sources."""
    roles: R.CategoryRoles
    notes: list
    train: list
    train_hashes: list
    ref_imgs: list
    ref_masks: list
    ref_hashes: list
    reference: dict                  # type -> [(image, mask, hash)] of reference defects
    scored_imgs: list
    scored_masks: np.ndarray
    labels: np.ndarray
    export: list
    plans: list
    sources: list
    mask_models: dict

    @property
    def evaluation_hashes(self) -> set[str]:
        return self.roles.evaluation_hashes


def _load_protocol(req: ExperimentRequest, say) -> _Protocol:
    """Roles, images (resized to ``req.size``), the scored set and the synthetic sources."""
    from pipelines.mvtec import check_sizes, load_category, load_image, load_mask
    cat = load_category(req.data)
    notes = check_sizes(cat)
    roles = R.category_roles(cat)
    if not roles.evaluation:
        raise ValueError(f"{req.data} has no evaluation defects to score (every defect type has a "
                         "single image, or evaluation.txt lists none)")
    if not roles.good:
        raise ValueError(f"{req.data}/test/good is empty: image AUROC needs good test images")
    if not roles.reference:
        raise ValueError(f"{req.data} has no reference defects (a type needs at least 2 images to "
                         "give one to reference)")
    S = int(req.size)
    say(0.0, f"loading {len(cat.train)} train/good, {len(roles.reference)} reference, "
             f"{len(roles.scored)} scored images")
    train = [load_image(p, S) for p in cat.train]
    train_hashes = [R.file_pixel_hash(p) for p in cat.train]
    ref_imgs = [load_image(s.path, S) for s in roles.reference]
    ref_masks = [load_mask(s, S) for s in roles.reference]
    ref_hashes = [roles.hashes[s.path] for s in roles.reference]
    reference: dict[str, list] = {}
    for s, img, m, h in zip(roles.reference, ref_imgs, ref_masks, ref_hashes):
        if m.any():
            reference.setdefault(s.label, []).append((img, m, h))
    _check_training_set("train/good", set(train_hashes), roles.evaluation_hashes)
    sources: list[str] = []
    export: list[Synthetic] = []
    if req.synthetic:
        export = load_export(req.synthetic, S, roles)
        sources.append("synthetic")
    plans = resolve_generators(req.generator_names(), req.model, roles, notes, req.product,
                               req.model_roots()) if req.generate else []
    if req.generate and not plans:
        raise ValueError("no generator can run here: " + "; ".join(notes))
    sources += [p.name for p in plans]
    missing = sorted({s.label for s in roles.evaluation} - set(reference))
    if plans and missing:
        notes.append(f"no reference defect of type(s) {', '.join(missing)}: nothing is generated for them")
    mask_models = {}
    if plans:
        from pipelines.shapes import estimate_foreground
        fg = estimate_foreground(train)
        mask_models = {t: MaskSampler.fit(t, [m for _, m, _ in refs], fg) for t, refs in reference.items()}
    return _Protocol(roles, notes, train, train_hashes, ref_imgs, ref_masks, ref_hashes, reference,
                     [load_image(s.path, S) for s in roles.scored],
                     np.stack([load_mask(s, S) for s in roles.scored]),
                     np.array([s.is_anomaly for s in roles.scored], int), export, plans, sources, mask_models)


class _Runs:
    """The K repeats: per repeat one PatchCore normal bank and the arms of every source."""

    def __init__(self, req: ExperimentRequest, d: _Protocol, say, cancelled: CancelFn | None):
        self.req, self.d, self.say, self.cancelled = req, d, say, cancelled
        self.pc_arms: dict[str, list] = {"reference_only": []}
        self.seg_arms: dict[str, list] = {"reference_only": []}
        for src in d.sources:
            self.pc_arms[f"{src}:reference_plus_synthetic"] = []
            self.seg_arms[f"{src}:synthetic_only"] = []
            self.seg_arms[f"{src}:reference_plus_synthetic"] = []
        self.hashes = {"patchcore_normal_bank": set(d.train_hashes), "patchcore_positive_bank": set(d.ref_hashes),
                       "segmenter": set(d.train_hashes) | set(d.ref_hashes)}
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[Synthetic]] = {}
        self.timing = {"patchcore_fit": 0.0, "patchcore_predict": 0.0, "segmenter_train": 0.0, "generate": 0.0}
        self.steps = 2 + 3 * len(d.sources)               # progress units per repeat

    def check(self) -> None:
        check_cancelled(self.cancelled, "experiment")

    def unit(self, k: int, j: int, msg: str) -> None:
        K = int(self.req.repeats)
        self.say(0.05 + 0.9 * (k * self.steps + j) / (K * self.steps), f"repeat {k + 1}/{K}: {msg}")

    def features(self, fc) -> None:
        self.say(0.02, "segmenter features of train/good, reference and scored images")
        d, c = self.d, self.cancelled
        self.fc = fc
        self.f_train, self.f_ref, self.f_scored = fc.features(d.train, c), fc.features(d.ref_imgs, c), \
            fc.features(d.scored_imgs, c)
        self.empty = [np.zeros((int(self.req.size),) * 2, bool)] * len(d.train)

    def _pc_score(self, arm: str) -> None:
        from pipelines.stats import summarize
        t1 = time.perf_counter()
        scores, maps = self.pc.predict(self.d.scored_imgs, cancelled=self.cancelled)
        self.timing["patchcore_predict"] += time.perf_counter() - t1
        self.pc_arms[arm].append(summarize(self.d.labels, scores, self.d.scored_masks, maps))

    def _seg(self, arm: str, feats: list, masks: list, seed: int) -> None:
        import torch

        from pipelines.segmenter import TrainConfig, predict_maps, train_segmenter
        from pipelines.stats import summarize
        self.check()
        t1 = time.perf_counter()
        cfg = TrainConfig(steps=int(self.req.segmenter_steps), seed=seed)
        model = train_segmenter(torch.cat(feats), list(masks), cfg, cancelled=self.cancelled)
        self.timing["segmenter_train"] += time.perf_counter() - t1
        scores, maps = predict_maps(model, self.f_scored, int(self.req.size))
        self.seg_arms[arm].append(summarize(self.d.labels, scores, self.d.scored_masks, maps))

    def repeat(self, k: int) -> None:
        """Repeat ``k`` (seed S+k): normal bank, the reference-only arms, then every source."""
        from pipelines.patchcore import PatchCore
        req, d, seed_k = self.req, self.d, int(self.req.seed) + k
        self.check()
        self.unit(k, 0, "PatchCore normal bank")
        pc_kw = {} if req.coreset is None else {"coreset": float(req.coreset)}
        if req.positive_coreset is not None:
            pc_kw["positive_coreset"] = float(req.positive_coreset)
        self.pc = PatchCore(backbone=req.backbone, size=int(req.size), seed=seed_k, **pc_kw)
        t0 = time.perf_counter()
        self.pc.fit(d.train, cancelled=self.cancelled)
        self.pc.fit_positive(d.ref_imgs, d.ref_masks)
        self.timing["patchcore_fit"] += time.perf_counter() - t0
        self._pc_score("reference_only")
        self.unit(k, 1, "segmenter on reference defects")
        self._seg("reference_only", [self.f_train, self.f_ref], [*self.empty, *d.ref_masks], seed_k)
        for j, src in enumerate(d.sources):
            self._source(k, j, src, seed_k)
        del self.pc

    def _synthetic(self, k: int, src: str) -> list[Synthetic]:
        d, req = self.d, self.req
        if src == "synthetic":
            return d.export
        t1 = time.perf_counter()
        plan = next(p for p in d.plans if p.name == src)
        syn = synthesize(plan, d.train, d.train_hashes, d.reference, d.mask_models, int(req.per_type),
                         int(req.seed), k, req.strength, req.feather, self.cancelled)
        self.timing["generate"] += time.perf_counter() - t1
        R.check_descent([(s.name, s.ancestors) for s in syn], d.evaluation_hashes)
        return syn

    def _source(self, k: int, j: int, src: str, seed_k: int) -> None:
        d = self.d
        self.check()
        self.unit(k, 2 + 3 * j, f"{src}: synthetic defects")
        syn = self._synthetic(k, src)
        if not syn:
            raise ValueError(f"{src}: no synthetic defects (no damage type has reference defects)")
        syn_hashes = {s.sha for s in syn}
        _check_training_set(f"{src} synthetic", syn_hashes, d.evaluation_hashes)
        self.counts[src] = len(syn)
        self.examples.setdefault(src, syn)
        self.hashes["patchcore_positive_bank"] |= syn_hashes
        self.hashes["segmenter"] |= syn_hashes
        syn_imgs, syn_masks = [s.image for s in syn], [s.mask for s in syn]
        self.unit(k, 3 + 3 * j, f"{src}: PatchCore positive bank")
        t1 = time.perf_counter()
        self.pc.fit_positive(d.ref_imgs + syn_imgs, d.ref_masks + syn_masks)
        self.timing["patchcore_fit"] += time.perf_counter() - t1
        self._pc_score(f"{src}:reference_plus_synthetic")
        self.unit(k, 4 + 3 * j, f"{src}: segmenters")
        f_syn = self.fc.features(syn_imgs, self.cancelled)
        self._seg(f"{src}:synthetic_only", [self.f_train, f_syn], [*self.empty, *syn_masks], seed_k)
        self._seg(f"{src}:reference_plus_synthetic", [self.f_train, self.f_ref, f_syn],
                  [*self.empty, *d.ref_masks, *syn_masks], seed_k)


def _blocks(req: ExperimentRequest, sources: list[str], run: _Runs) -> dict:
    """Per source: both arms' bootstrap summaries, the deltas and the verdicts."""
    blocks = {}
    for src in sources:
        pc_cmp = compare({"reference_only": run.pc_arms["reference_only"],
                          "reference_plus_synthetic": run.pc_arms[f"{src}:reference_plus_synthetic"]},
                         {"delta": ("reference_plus_synthetic", "reference_only")},
                         n_boot=req.n_boot, seed=req.seed)
        seg_cmp = compare({"synthetic_only": run.seg_arms[f"{src}:synthetic_only"],
                           "reference_only": run.seg_arms["reference_only"],
                           "reference_plus_synthetic": run.seg_arms[f"{src}:reference_plus_synthetic"]},
                          {"delta": ("reference_plus_synthetic", "reference_only"),
                           "delta_synthetic_only": ("synthetic_only", "reference_only")},
                          n_boot=req.n_boot, seed=req.seed)
        blocks[src] = {"patchcore": {**pc_cmp["arms"], **pc_cmp["deltas"]},
                       "segmenter": {**seg_cmp["arms"], **seg_cmp["deltas"]},
                       "n_synthetic": run.counts[src]}
        blocks[src]["verdict"] = _verdicts(src, blocks[src])
        blocks[src]["by_type"] = _by_type(req, src, run)
    return blocks


def _by_type(req: ExperimentRequest, src: str, run: _Runs) -> dict:
    """Per damage type: the same comparisons on that type's evaluation defects + every good
    image (the per-image statistics restricted, the bootstrap redrawn on the subset). Few
    images per type: read the intervals, they are wide."""
    labels = [s.label for s in run.d.roles.scored]
    good = [i for i, s in enumerate(run.d.roles.scored) if not s.is_anomaly]
    out = {}
    for t in sorted({lab for lab, s in zip(labels, run.d.roles.scored) if s.is_anomaly}):
        idx = [i for i, s in enumerate(run.d.roles.scored) if s.is_anomaly and s.label == t] + good
        sub = lambda reps: [r.subset(idx) for r in reps]
        pc = compare({"reference_only": sub(run.pc_arms["reference_only"]),
                      "reference_plus_synthetic": sub(run.pc_arms[f"{src}:reference_plus_synthetic"])},
                     {"delta": ("reference_plus_synthetic", "reference_only")},
                     n_boot=req.n_boot, seed=req.seed)
        seg = compare({"synthetic_only": sub(run.seg_arms[f"{src}:synthetic_only"]),
                       "reference_only": sub(run.seg_arms["reference_only"]),
                       "reference_plus_synthetic": sub(run.seg_arms[f"{src}:reference_plus_synthetic"])},
                      {"delta": ("reference_plus_synthetic", "reference_only"),
                       "delta_synthetic_only": ("synthetic_only", "reference_only")},
                      n_boot=req.n_boot, seed=req.seed)
        out[t] = {"n_evaluation": len(idx) - len(good), "patchcore": {**pc["arms"], **pc["deltas"]},
                  "segmenter": {**seg["arms"], **seg["deltas"]}}
    return out


def _result(req: ExperimentRequest, d: _Protocol, run: _Runs, blocks: dict, t_start: float) -> dict:
    """metrics.json: the blocks of the docstring of :func:`run_experiment`."""
    top = d.sources[0]
    pc_top = blocks[top]["patchcore"]
    result = {
        "real_only": {k: pc_top["reference_only"][k]["mean"] for k in METRIC_KEYS},
        "with_synthetic": {k: pc_top["reference_plus_synthetic"][k]["mean"] for k in METRIC_KEYS},
        "delta": {k: pc_top["delta"][k]["mean"] for k in METRIC_KEYS},
        "protocol": {
            "evaluation": d.roles.rel(d.roles.evaluation), "reference": d.roles.rel(d.roles.reference),
            "scored": d.roles.rel(d.roles.scored), "train_good": len(d.train), "roles_source": d.roles.source,
            "repeats": int(req.repeats), "seed": int(req.seed), "n_boot": int(req.n_boot),
            "primary_metric": PRIMARY_METRIC, "backbone": req.backbone, "coreset": req.coreset,
            "positive_coreset": req.positive_coreset,
            "size": int(req.size), "segmenter_steps": int(req.segmenter_steps),
            "per_type": int(req.per_type) if d.plans else None,
            "product": req.product, "model_roots": [str(r) for r in req.model_roots()],
        },
        "source": top,
        "patchcore": blocks[top]["patchcore"],
        "segmenter": blocks[top]["segmenter"],
        "verdict": blocks[top]["verdict"],
        "by_type": blocks[top]["by_type"],
        "n_synthetic": run.counts[top],
    }
    if d.plans:
        result["backends"] = {p.name: blocks[p.name] for p in d.plans}
        result["generators"] = {p.name: p.provenance() for p in d.plans}
    if req.synthetic:
        result["synthetic"] = {"folder": str(Path(req.synthetic).resolve()), "samples": len(d.export),
                               "per_type": _per_type(d.export)}
    result.update({
        "training_hashes": {k: sorted(v) for k, v in run.hashes.items()},
        "notes": d.notes,
        "data": {"category": str(Path(req.data).resolve()), **_folder_digest(Path(req.data))},
        "request": asdict(req), "versions": _versions(),
        "timing": {k: round(v, 2) for k, v in run.timing.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return result


def _per_type(samples: Sequence[Synthetic]) -> dict[str, int]:
    c: dict[str, int] = {}
    for s in samples:
        c[s.label] = c.get(s.label, 0) + 1
    return dict(sorted(c.items()))


def _verdicts(src: str, block: dict) -> dict:
    pc, seg = block["patchcore"], block["segmenter"]
    per = {"patchcore": {k: pc["delta"][k]["verdict"] for k in METRIC_KEYS},
           "segmenter": {k: seg["delta"][k]["verdict"] for k in METRIC_KEYS},
           "segmenter_synthetic_only": {k: seg["delta_synthetic_only"][k]["verdict"] for k in METRIC_KEYS}}

    def phrase(name, d):
        v = d[PRIMARY_METRIC]
        return (f"{name}: {verdict(v['ci95'])} ({PRIMARY_METRIC} {v['mean']:+.3f}, 95 % CI "
                f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}])")
    text = "; ".join([phrase(f"PatchCore positive bank + {src}", pc["delta"]),
                      phrase(f"segmenter reference + {src}", seg["delta"]),
                      phrase(f"segmenter {src} only (vs reference only)", seg["delta_synthetic_only"])])
    return {"metric": PRIMARY_METRIC, "patchcore": per["patchcore"][PRIMARY_METRIC],
            "segmenter": per["segmenter"][PRIMARY_METRIC],
            "segmenter_synthetic_only": per["segmenter_synthetic_only"][PRIMARY_METRIC],
            "per_metric": per, "text": text}


def _folder_digest(folder: Path, pattern: str = "**/*.png") -> dict:
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return {"files": len(files), "sha256": h.hexdigest()[:16]}


def _write_samples(out: Path, examples: dict[str, list[Synthetic]], per_source: int = 8) -> None:
    """``samples/<source>.png``: up to ``per_source`` synthetic defects (spread over the types)
    with their mask outlined in green."""
    from pipelines.imageio import write_png_atomic
    for src, syn in examples.items():
        by_type: dict[str, list[Synthetic]] = {}
        for s in syn:
            by_type.setdefault(s.label, []).append(s)
        picked: list[Synthetic] = []
        while len(picked) < min(per_source, len(syn)):
            for t in sorted(by_type):
                if by_type[t] and len(picked) < per_source:
                    picked.append(by_type[t].pop(0))
        tiles = []
        for s in picked:
            img = np.ascontiguousarray(s.image.copy())
            contours, _ = cv2.findContours(s.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
            tiles.append(img)
        if tiles:
            write_png_atomic(out / "samples" / f"{src.replace('/', '_')}.png", np.concatenate(tiles, axis=1))


# ------------------------------------------------------------------------------------------------
# Report and figure


def _fmt(v: dict) -> str:
    return f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def _fmt_delta(v: dict) -> str:
    return f"{v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] {v['verdict']}"


SEG_ARMS = ("synthetic_only", "reference_only", "reference_plus_synthetic")
PC_ARMS = ("reference_only", "reference_plus_synthetic")


def source_blocks(r: dict) -> dict[str, dict]:
    """``{source: {"patchcore", "segmenter", "verdict"}}`` of a result, in run order."""
    out = {}
    if r.get("synthetic") or not r.get("backends"):
        out[r.get("source", "synthetic")] = {k: r[k] for k in ("patchcore", "segmenter", "verdict", "by_type")
                                             if k in r}
    out.update(r.get("backends") or {})
    return out


def table_rows(r: dict) -> list[dict]:
    """One row per (source, model, arm or delta) with each metric as ``mean [lo, hi]``."""
    rows = []
    for src, b in source_blocks(r).items():
        for model, arms in (("PatchCore", PC_ARMS + ("delta",)),
                            ("segmenter", SEG_ARMS + ("delta", "delta_synthetic_only"))):
            block = b["patchcore" if model == "PatchCore" else "segmenter"]
            for arm in arms:
                row = {"source": src, "model": model, "arm": arm}
                for k in METRIC_KEYS:
                    row[k] = _fmt_delta(block[arm][k]) if arm.startswith("delta") else _fmt(block[arm][k])
                rows.append(row)
    return rows


def report_markdown(r: dict) -> str:
    p = r["protocol"]
    lines = ["# Did synthetic data help?", ""]
    for src, b in source_blocks(r).items():
        lines.append(f"- **{src}** — {b['verdict']['text']}.")
    lines += ["", "A verdict comes only from the 95 % interval of a difference: *helped* (entirely above 0), "
              "*hurt* (entirely below 0), *no detectable effect* (contains 0). Intervals: paired, stratified "
              f"bootstrap over the evaluation images ({p['n_boot']} draws), metrics averaged over "
              f"{p['repeats']} repeats (seeds {p['seed']}…{p['seed'] + p['repeats'] - 1}). Per-metric "
              "intervals are not adjusted for multiple comparisons.", "",
              "## Protocol", "",
              f"- Data: `{r['data']['category']}` ({r['data']['files']} files, sha256 {r['data']['sha256']}); "
              f"roles from {p['roles_source']}: {len(p['reference'])} reference defects (may be learned from), "
              f"{len(p['evaluation'])} evaluation defects (only scored), {p['train_good']} train/good.",
              f"- Scored: {len(p['scored'])} images (evaluation defects + test/good).",
              f"- Arm A: PatchCore `{p['backbone']}`, {p['size']} px, coreset "
              f"{'default' if p['coreset'] is None else p['coreset']}; normal bank on train/good (once per "
              "repeat); positive bank = reference defect crops only vs reference + synthetic.",
              f"- Arm B: segmenter (1×1 + 3×3 conv decoder on frozen `{p['backbone']}` features, "
              f"{p['segmenter_steps']} steps, BCE + Dice) trained on synthetic only / reference only / both, "
              "always with every train/good image as a negative.",
              ]
    if p.get("per_type"):
        lines.append(f"- Generated: {p['per_type']} per damage type and repeat on train/good images, masks "
                     "from the shape model fitted on the type's reference masks (pipelines.shapes, on the "
                     "product foreground); donors (cut-paste, defect transfer) are reference defects only.")
    for name, g in (r.get("generators") or {}).items():
        if g.get("models"):
            by_folder: dict[str, list[str]] = {}
            for t, f in g["models"].items():
                by_folder.setdefault(f, []).append(t)
            lines.append(f"- {name} models: " + "; ".join(
                f"{', '.join(ts)} → `{f}` ({(g.get('model_sources') or {}).get(f, '?')}; its training data: "
                f"{(g.get('model_training_images') or {}).get(f, '?')} real images, none evaluated)"
                for f, ts in by_folder.items()))
        for t, why in g.get("skipped_types", {}).items():
            lines.append(f"- {name}: nothing generated for {t} — {why}")
    if r.get("synthetic"):
        lines.append(f"- Export: `{r['synthetic']['folder']}`, {r['synthetic']['samples']} samples "
                     f"({', '.join(f'{k} {v}' for k, v in r['synthetic']['per_type'].items())}); checked "
                     "against the evaluation images (pixels and provenance).")
    for src, b in source_blocks(r).items():
        lines += ["", f"## {src}", "", "| model | arm | " + " | ".join(METRIC_KEYS) + " |",
                  "|---|---|" + "---|" * len(METRIC_KEYS)]
        for row in (row for row in table_rows(r) if row["source"] == src):
            lines.append(f"| {row['model']} | {row['arm']} | " + " | ".join(row[k] for k in METRIC_KEYS) + " |")
    typed = {src: b["by_type"] for src, b in source_blocks(r).items() if b.get("by_type")}
    if typed:
        lines += ["", f"## Per damage type ({PRIMARY_METRIC}; each type's evaluation defects + every good image)", "",
                  "| source | type | n | segmenter synthetic only | segmenter reference only | "
                  "segmenter reference + synthetic | PatchCore reference only | PatchCore Δ (+ synthetic) |",
                  "|---|---|---|---|---|---|---|---|"]
        for src, per in typed.items():
            for t, b in per.items():
                seg, pc = b["segmenter"], b["patchcore"]
                lines.append(f"| {src} | {t} | {b['n_evaluation']} | {_fmt(seg['synthetic_only'][PRIMARY_METRIC])} | "
                             f"{_fmt(seg['reference_only'][PRIMARY_METRIC])} | "
                             f"{_fmt(seg['reference_plus_synthetic'][PRIMARY_METRIC])} | "
                             f"{_fmt(pc['reference_only'][PRIMARY_METRIC])} | {_fmt_delta(pc['delta'][PRIMARY_METRIC])} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    t = r.get("timing", {})
    lines += ["", f"Run time {r['seconds']:.0f} s (PatchCore fit {t.get('patchcore_fit', 0):.0f} s, predict "
                  f"{t.get('patchcore_predict', 0):.0f} s, segmenter training {t.get('segmenter_train', 0):.0f} s, "
                  f"generation {t.get('generate', 0):.0f} s). "
                  f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}. {r['created_at']}", ""]
    return "\n".join(lines)


def experiment_figure(r: dict):
    """Plotly figure: per model, the difference to reference-only training for each metric, with
    95 % intervals as error bars (a bar whose interval excludes 0 is an effect)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("PatchCore positive bank: + synthetic − reference only",
                                                        "Segmenter: arm − reference only"), shared_yaxes=False)
    palette = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2")
    for i, (src, b) in enumerate(source_blocks(r).items()):
        series = [(1, b["patchcore"]["delta"], f"{src}: reference + synthetic", palette[(2 * i) % 6]),
                  (2, b["segmenter"]["delta"], f"{src}: reference + synthetic", palette[(2 * i) % 6]),
                  (2, b["segmenter"]["delta_synthetic_only"], f"{src}: synthetic only", palette[(2 * i + 1) % 6])]
        for col, d, name, colour in series:
            y = [d[k]["mean"] for k in METRIC_KEYS]
            fig.add_bar(x=list(METRIC_KEYS), y=y, name=name, marker_color=colour, legendgroup=name,
                        showlegend=col == 1 or "synthetic only" in name,
                        error_y=dict(type="data", symmetric=False,
                                     array=[d[k]["ci95"][1] - d[k]["mean"] for k in METRIC_KEYS],
                                     arrayminus=[d[k]["mean"] - d[k]["ci95"][0] for k in METRIC_KEYS]),
                        hovertext=[f"{d[k]['verdict']}: {d[k]['mean']:+.3f} [{d[k]['ci95'][0]:+.3f}, "
                                   f"{d[k]['ci95'][1]:+.3f}]" for k in METRIC_KEYS], row=1, col=col)
    fig.add_hline(y=0, line_color="#444", line_width=1)
    fig.update_layout(barmode="group", height=380, margin=dict(l=40, r=10, t=60, b=40),
                      title=f"Δ metric vs reference-only training (mean of {r['protocol']['repeats']} repeats, 95 % CI)")
    return fig


def write_figure(r: dict, out: Path) -> list[str]:
    """``figure.html`` (plotly.js embedded: opens offline) and ``figure.png`` when kaleido is
    installed. Returns the files written."""
    fig = experiment_figure(r)
    atomic_write_text(out / "figure.html", fig.to_html(include_plotlyjs=True, full_html=True))
    written = ["figure.html"]
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return written
    try:
        fig.write_image(str(out / "figure.png"), width=1100, height=420)
        written.append("figure.png")
    except Exception:  # noqa: BLE001 — kaleido without a usable browser: the HTML is enough
        pass
    return written


__all__ = ["ExperimentRequest", "run_experiment", "report_markdown", "experiment_figure", "write_figure",
           "table_rows", "source_blocks", "MaskSampler", "load_export",
           "resolve_generators", "experiment_generators", "synthesize", "METRIC_KEYS", "PRIMARY_METRIC"]
