"""Which generators the experiment runs, with which model per damage type, and the synthetic
defects they make on equal terms (same base images, masks and seeds for every generator)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipelines import roles as R
from pipelines.masks import visible_label
from pipelines.training import CancelFn, check_cancelled
from studio.experiment.sources import MaskSampler, Synthetic

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
    candidates: list["GeneratorPlan"] = field(default_factory=list)        # auto: the plans it chooses among
    choices: dict[int, dict] = field(default_factory=dict)                # auto: fold -> {type: Choice}

    def provenance(self, scored: set[str] = frozenset()) -> dict:
        """What metrics.json records of the generator: version, the model folder per damage type
        (and where it was found: ``--model``, the env variable, a workspace run, shipped), how many
        real images each model learned from, and the types it made nothing for, with the reason."""
        return {"version": self.info.version,
                "models": dict(sorted(self.models.items())) or None,
                "model_sources": dict(sorted(self.model_sources.items())) or None,
                "model_training_images": {m: len(a) for m, a in sorted(self.model_ancestors.items())} or None,
                "model_training_scored": {m: len(set(a) & set(scored))
                                          for m, a in sorted(self.model_ancestors.items())} or None,
                "skipped_types": dict(sorted(self.skipped_types.items())),
                **({"candidates": [c.name for c in self.candidates],
                    "choices": {str(f): {t: c.to_json() for t, c in sorted(ch.items())}
                                for f, ch in sorted(self.choices.items())}} if self.candidates else {})}

    @property
    def is_auto(self) -> bool:
        return self.name == AUTO


AUTO = "auto"   # the per-type choice (pipelines.generators.choose), measured on reference defects only


def auto_plan(plans: Sequence[GeneratorPlan], roles: R.CategoryRoles, notes: list[str], product: str | None,
              roots: Sequence[str | Path]) -> GeneratorPlan:
    """The ``auto`` source: per fold and damage type, the candidate whose synthetic defects best
    teach a segmenter to find the fold's *reference* defects left out in turn
    (:func:`pipelines.generators.choose.choose`); its synthetic defects of the type are those the
    chosen generator makes from the same base images, masks and seeds. Candidates: the run's
    other generators that :func:`pipelines.generators.choose.candidates` admits (all of them
    when ``auto`` is the only name)."""
    from pipelines.generator import GeneratorInfo
    from pipelines.generators.choose import VERSION, candidates
    names = candidates([p.name for p in plans]) or candidates(experiment_generators(product, roots))
    pool = [p for p in plans if p.name in names] or resolve_generators(names, None, roles, notes, product, roots)
    if not pool:
        raise ValueError("auto: no generator to choose from (every candidate learned from a trained model)")
    info = GeneratorInfo(AUTO, VERSION, "damage", "per damage type, the generator best on left-out reference defects")
    return GeneratorPlan(AUTO, None, info, candidates=pool)


def experiment_generators(product: str | None = None, roots: Sequence[str | Path] = ()) -> list[str]:
    """What ``--generate all`` means: every damage generator of the registry that runs here
    offline — no hub weights (``info.needs_model``), in-mask (not ``full_image``), available now
    (for ``product`` when given: a data-trained one such as pixel-inpaint only when a model for the
    product is found, in ``roots`` — the workspace's trained runs — or shipped)."""
    from pipelines.registry import get_info, offline_names
    return [n for n in offline_names("damage", product, roots)
            if not get_info(n).needs_model and not get_info(n).full_image]


SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "assets" / "models"   # <product>/<generator>/


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
    from pipelines.registry import get_info
    want_auto = AUTO in names
    names = [n for n in names if n != AUTO]
    explicit = [n for n in names if n != "all"]
    types = sorted({s.label for s in roles.reference})
    wanted = _expand_all(model, product, roots, notes) if "all" in names else []
    wanted += [n for n in explicit if n not in wanted]
    plans = []
    for name in wanted:
        info = get_info(name)                  # KeyError listing the known names
        if info.mode != "damage" or info.full_image:
            raise ValueError(f"generator {name!r} does not make a defect inside a mask; the experiment "
                             f"can generate with: {', '.join(experiment_generators())}")
        plan, problem = _plan_for(name, model, types, product, roots, roles)
        if problem:
            if name in explicit:
                raise ValueError(f"generator {name}: {problem}")
            notes.append(f"skipped {name}: {problem}")
            continue
        if not plan.models:
            R.check_descent([(f"generator {name} (its training data)", plan.ancestors)], roles.evaluation_hashes)
        else:
            notes.append(_models_note(plan))
        plans.append(plan)
    from pipelines.generators.choose import candidates
    if want_auto or ("all" in names and len(candidates([p.name for p in plans])) >= 2):
        plans.append(auto_plan(plans, roles, notes, product, roots))
    return plans


def _expand_all(model: str | None, product: str | None, roots: Sequence[str | Path], notes: list[str]) -> list[str]:
    """``all``: the generators that run here (:func:`experiment_generators`, pixel-inpaint too
    when a model is given); a note for each mask generator left out and why."""
    from pipelines.registry import GENERATORS, backend_status, get_info, picks_model
    wanted = experiment_generators(product, roots)
    if model and "pixel-inpaint" in GENERATORS and "pixel-inpaint" not in wanted:
        wanted.append("pixel-inpaint")          # a model given on the command line
    skipped = [n for n in GENERATORS if get_info(n).mode == "damage" and n not in wanted
               and not get_info(n).needs_model and not get_info(n).full_image]
    for n in skipped:
        notes.append(f"skipped {n}: {backend_status(n, product, roots)[1]}"
                     + (_run_hint(n, product, roots) if picks_model(n) else ""))
    return wanted


def _plan_for(name: str, model: str | None, types: list[str], product: str | None,
              roots: Sequence[str | Path], roles: R.CategoryRoles) -> tuple[GeneratorPlan, str | None]:
    """``(plan, problem)``: the generator with its model per type (the one given, or the one
    picked for the product) and what it learned from checked against the evaluation images;
    ``problem`` says why it cannot run (None: it can)."""
    from pipelines.registry import get_generator, get_info, model_types, picks_model
    info = get_info(name)
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
    return plan, problem


def _models_note(plan: GeneratorPlan) -> str:
    """"<name>: <types> with the model <folder> (<source>); type <t> skipped: <why>"."""
    by_folder: dict[str, list[str]] = {}
    for t, f in sorted(plan.models.items()):
        by_folder.setdefault(f, []).append(t)
    return (f"{plan.name}: " + "; ".join(f"{', '.join(ts)} with the model {f} ({plan.model_sources[f]})"
                                         for f, ts in by_folder.items())
            + "".join(f"; type {t} skipped: {why}" for t, why in sorted(plan.skipped_types.items())))


def _run_hint(name: str, product: str | None, roots: Sequence[str | Path]) -> str:
    where = f"{Path(roots[0]) / '<run>'}" if roots else "<workspace>/adapters/<run>"
    return (f"; for the experiment: --model <folder>, or train into {where} from a category folder named "
            f"{product or '<product>'!r} and it is picked up")


_NO_MANIFEST = ("its model lists no training data (training_data.json), so what it learned from cannot be "
                "checked against the evaluation images; retrain it with `python -m studio train`")


def synthesize(plan: GeneratorPlan, train: Sequence[np.ndarray], train_hashes: Sequence[str],
               reference: dict[str, list[tuple[np.ndarray, np.ndarray, str]]],
               masks: dict[str, MaskSampler], per_type: int, seed: int, repeat: int, strength: float,
               feather: int, cancelled: CancelFn | None = None, fold: int | None = None) -> list[Synthetic]:
    """``per_type`` synthetic defects per damage type with reference defects (``reference``:
    type → [(image, mask, pixel hash)]). The base image, mask and generator seed of item ``i``
    of type ``t`` depend only on ``(seed, repeat, fold, t, i)``, never on the generator. Parameters as
    :func:`studio.services.generate` passes them: feather, damage type, strength when the
    generator takes it, donors (that type's reference defects only) when it needs them. Each
    sample's label is the part of its mask the generator visibly changed
    (:func:`pipelines.masks.visible_label`)."""
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
            key = [int(seed), int(repeat), type_key, i] if fold is None else [int(seed), int(repeat), int(fold), type_key, i]
            rng = np.random.default_rng(key)
            base = int(rng.integers(len(train)))
            mask = masks[t].sample(train[base].shape[:2], rng, image=train[base])
            gen_seed = int(rng.integers(2 ** 31 - 1))
            img = np.ascontiguousarray(plan.generator(train[base], mask.astype(np.uint8) * 255,
                                                      seed=gen_seed, **params))
            out.append(Synthetic(img, visible_label(train[base], img, mask), t, f"{plan.name}/r{repeat}/{t}/{i:03d}",
                                 R.pixel_hash(img), sorted({train_hashes[base], *ancestors})))
    return out

