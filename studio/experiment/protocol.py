"""The protocol: folds × repeats × arms, every training set guarded where it is fit.

Per repeat ``k`` (seed ``S + k``) the PatchCore normal bank is fitted on train/good once; per
fold ``f`` (:mod:`studio.experiment.folds`) the positive bank is refitted on the fold's reference
defects (± synthetic), the segmenters are trained on them, and both score the fold's evaluation
defects plus every test/good image. Every array a model is fitted on passes
:func:`pipelines.guard.guard` against the images that fold scores (decoded pixels, exact and
near-duplicate), and the hashes it returns are what ``metrics.json`` → ``training_hashes``
records. Statistics: :mod:`pipelines.stats` (two-level bootstrap over images and repeats, folds
pooled, Holm over every verdict the run reports).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines import roles as R
from pipelines.training import CancelFn, Cancelled, ProgressFn, check_cancelled
from studio.experiment.folds import Fold, default_folds, make_folds
from studio.experiment.generators import GeneratorPlan, resolve_generators, synthesize
from studio.experiment.request import ExperimentRequest
from studio.experiment.sources import MaskSampler, Synthetic, load_export


AUTO_PER_TYPE, AUTO_STEPS = 6, 100     # the auto choice's measurement (pipelines.generators.choose)


@contextlib.contextmanager
def deterministic(threads: int):
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
def as_cancelled(*kinds: type):
    """Re-raise another module's cancel exception as the one :class:`pipelines.training.Cancelled`."""
    try:
        yield
    except Cancelled:
        raise
    except kinds as exc:
        raise Cancelled(str(exc)) from exc


@dataclass
class Protocol:
    """The data of one experiment: every real defect, the folds, the scored goods, the sources.

    Images are ``[S x S x 3]`` uint8 at the request's size; masks ``[S x S]`` bool. Global image
    ids (for the bootstrap): test/good ``0..G-1``, real defect ``i`` → ``G + i``."""
    roles: R.CategoryRoles
    notes: list
    train: list
    train_hashes: list                     # file pixel hashes of train/good
    defects: list                          # TestSample of every real defect (category order)
    def_imgs: list
    def_masks: list
    good: list                             # TestSample of test/good
    good_imgs: list
    folds: list                            # Fold
    folds_source: str                      # "cross-fitting" | the product's roles
    export: list
    plans: list
    sources: list
    foreground: np.ndarray | None = None
    mask_models: dict = field(default_factory=dict)   # fold index -> {type: MaskSampler}

    @property
    def G(self) -> int:
        return len(self.good)

    def rel(self, idx) -> list[str]:
        return self.roles.rel([self.defects[i] for i in idx])

    def defect_hash(self, i: int) -> str:
        return self.roles.hashes[self.defects[i].path]

    def reference(self, fold: Fold) -> dict[str, list[tuple[np.ndarray, np.ndarray, str]]]:
        """type → [(image, mask, file pixel hash)] of the fold's reference defects with a mask."""
        out: dict[str, list] = {}
        for i in fold.reference:
            if self.def_masks[i].any():
                out.setdefault(self.defects[i].label, []).append(
                    (self.def_imgs[i], self.def_masks[i], self.defect_hash(i)))
        return out

    def scored(self, fold: Fold) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """``(images, masks [N x S x S], labels [N], ids [N], names)``: the fold's evaluation
        defects, then every test/good image."""
        S = self.train[0].shape[0]
        imgs = [self.def_imgs[i] for i in fold.evaluation] + list(self.good_imgs)
        masks = np.stack([self.def_masks[i] for i in fold.evaluation] + [np.zeros((S, S), bool)] * self.G)
        labels = np.array([1] * len(fold.evaluation) + [0] * self.G, int)
        ids = np.array([self.G + i for i in fold.evaluation] + list(range(self.G)), int)
        names = self.rel(fold.evaluation) + self.roles.rel(self.good)
        return imgs, masks, labels, ids, names

    def scored_set(self, fold: Fold):
        """:class:`pipelines.guard.ScoredSet` of what the fold scores."""
        from pipelines.guard import ScoredSet
        imgs, _, _, _, names = self.scored(fold)
        return ScoredSet.from_images(zip(names, imgs))

    def all_scored_set(self):
        from pipelines.guard import ScoredSet
        named = [(n, img) for f in self.folds for n, img in zip(self.rel(f.evaluation),
                                                                 (self.def_imgs[i] for i in f.evaluation))]
        return ScoredSet.from_images(named + list(zip(self.roles.rel(self.good), self.good_imgs)))


def _resolve_sources(req: ExperimentRequest, roles: R.CategoryRoles, learn_roles: R.CategoryRoles,
                     notes: list, S: int) -> tuple[list[Synthetic], list[GeneratorPlan]]:
    export = load_export(req.synthetic, S, learn_roles) if req.synthetic else []
    plans = resolve_generators(req.generator_names(), req.model, learn_roles, notes, req.product,
                               req.model_roots()) if req.generate else []
    if req.generate and not plans:
        raise ValueError("no generator can run here: " + "; ".join(notes))
    return export, plans


def _all_scored_roles(roles: R.CategoryRoles) -> R.CategoryRoles:
    """Roles as seen from cross-fitting: every real defect is scored in some fold (and is a
    reference defect in the others), so nothing fixed — an export's ancestry, a trained model's
    data — may descend from any of them."""
    defects = roles.reference + roles.evaluation
    return R.CategoryRoles(roles.root, defects, defects, roles.good, roles.hashes,
                           "cross-fitting", roles.fraction, roles._order)


def load_protocol(req: ExperimentRequest, say) -> Protocol:
    """Roles, images (resized to ``req.size``), the folds and the synthetic sources."""
    from pipelines.mvtec import check_sizes, load_category, load_image, load_mask
    cat = load_category(req.data)
    notes = check_sizes(cat)
    roles = R.category_roles(cat)
    defects = [s for s in cat.test if s.is_anomaly]
    if not roles.good:
        raise ValueError(f"{req.data}/test/good is empty: image AUROC needs good test images")
    k = int(req.folds) if req.folds else default_folds(defects, roles.hashes)
    S = int(req.size)
    export, plans = [], []
    base_notes = list(notes)
    if k > 1:
        try:
            export, plans = _resolve_sources(req, roles, _all_scored_roles(roles), notes, S)
        except R.LeakageError as exc:
            if req.folds:
                raise R.LeakageError(f"{exc} — with --folds {k} every real defect is scored in some fold; "
                                     "use --folds 1 to keep the product's roles") from None
            notes[:] = base_notes + [f"one fold (the product's roles) instead of {k}: {exc}"]
            k = 1
    if k == 1:
        if not roles.evaluation:
            raise ValueError(f"{req.data} has no evaluation defects to score (every defect type has a "
                             "single image, or evaluation.txt lists none)")
        if not roles.reference:
            raise ValueError(f"{req.data} has no reference defects (a type needs at least 2 images to "
                             "give one to reference)")
        export, plans = _resolve_sources(req, roles, roles, notes, S)
    folds = make_folds(defects, roles.hashes, k, roles)
    say(0.0, f"loading {len(cat.train)} train/good, {len(defects)} real defects, {len(roles.good)} test/good "
             f"({k} fold{'s' * (k > 1)})")
    train = [load_image(p, S) for p in cat.train]
    train_hashes = [R.file_pixel_hash(p) for p in cat.train]
    every = set(roles.hashes[s.path] for s in defects) | {roles.hashes.get(s.path) or R.file_pixel_hash(s.path)
                                                          for s in roles.good}
    leak = set(train_hashes) & every
    if leak:
        raise R.LeakageError(f"train/good holds {len(leak)} image(s) that are scored ({sorted(leak)[0][:12]}…); "
                             "refusing to run")
    d = Protocol(roles, notes, train, train_hashes, defects,
                 [load_image(s.path, S) for s in defects], [load_mask(s, S) for s in defects],
                 list(roles.good), [load_image(s.path, S) for s in roles.good], folds,
                 "cross-fitting" if k > 1 else roles.source, export, plans,
                 (["synthetic"] if req.synthetic else []) + [p.name for p in plans])
    for f in folds:
        types_ref = set(d.reference(f))
        missing = sorted({d.defects[i].label for i in f.evaluation} - types_ref)
        if plans and missing:
            notes.append(f"fold {f.index + 1}/{k}: no reference defect of type(s) {', '.join(missing)}: "
                         "nothing is generated for them")
    if plans:
        from pipelines.shapes import estimate_foreground
        d.foreground = estimate_foreground(train)
        for f in folds:
            d.mask_models[f.index] = {t: MaskSampler.fit(t, [m for _, m, _ in refs], d.foreground,
                                                         [i for i, _, _ in refs])
                                      for t, refs in d.reference(f).items()}
    return d


class Runs:
    """The K repeats × F folds: per repeat one PatchCore normal bank; per fold the arms of every
    source. ``pc_arms`` / ``seg_arms``: arm → ``[K][F]`` :class:`pipelines.stats.EvalSummary`."""

    def __init__(self, req: ExperimentRequest, d: Protocol, say, cancelled: CancelFn | None):
        self.req, self.d, self.say, self.cancelled = req, d, say, cancelled
        K, F = int(req.repeats), len(d.folds)
        names_pc = ["reference_only"] + [f"{s}:reference_plus_synthetic" for s in d.sources]
        names_seg = ["reference_only"] + [f"{s}:{a}" for s in d.sources
                                          for a in ("synthetic_only", "reference_plus_synthetic")]
        self.pc_arms = {n: [[None] * F for _ in range(K)] for n in names_pc}
        self.seg_arms = {n: [[None] * F for _ in range(K)] for n in names_seg}
        self.hashes: dict[str, set[str]] = {"patchcore_normal_bank": set(), "patchcore_positive_bank": set(),
                                            "segmenter": set()}
        self.fit_counts: list[dict] = [dict() for _ in range(F)]
        self.fold_hashes: list[set[str]] = [set() for _ in range(F)]   # every array fit in the fold
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[Synthetic]] = {}
        self.timing = {"patchcore_fit": 0.0, "patchcore_predict": 0.0, "segmenter_train": 0.0,
                       "generate": 0.0, "guard": 0.0}
        self.steps = F * (2 + 3 * len(d.sources))          # progress units per repeat
        self.scored_sets = [d.scored_set(f) for f in d.folds]
        self.scored = [d.scored(f) for f in d.folds]

    def check(self) -> None:
        check_cancelled(self.cancelled, "experiment")

    def unit(self, k: int, j: int, msg: str) -> None:
        K = int(self.req.repeats)
        self.say(0.05 + 0.9 * (k * self.steps + j) / (K * self.steps), f"repeat {k + 1}/{K}: {msg}")

    def guard(self, what: str, f: int | None, items: list[tuple[str, np.ndarray]]) -> list[str]:
        """:func:`pipelines.guard.guard` of exactly the arrays about to be fit → their hashes."""
        from pipelines.guard import guard
        t0 = time.perf_counter()
        scored = self.all_scored if f is None else self.scored_sets[f]
        where = "" if f is None or len(self.d.folds) == 1 else f" (fold {f + 1})"
        hashes = guard(items, scored, f"experiment: the {what}{where}")
        self.timing["guard"] += time.perf_counter() - t0
        for g in (range(len(self.d.folds)) if f is None else (f,)):
            self.fold_hashes[g] |= set(hashes)
        return hashes

    def features(self, fc) -> None:
        self.say(0.02, "segmenter features of train/good, real defects and test/good")
        d, c = self.d, self.cancelled
        self.fc = fc
        self.f_train, self.f_def, self.f_good = fc.features(d.train, c), fc.features(d.def_imgs, c), \
            fc.features(d.good_imgs, c)
        self.empty = [np.zeros((int(self.req.size),) * 2, bool)] * len(d.train)
        self.all_scored = d.all_scored_set()
        self.train_items = [(f"train/good/{i}", img) for i, img in enumerate(d.train)]

    def _pc_score(self, arm: str, k: int, f: int) -> None:
        from pipelines.stats import summarize
        imgs, masks, labels, ids, _ = self.scored[f]
        t1 = time.perf_counter()
        scores, maps = self.pc.predict(imgs, cancelled=self.cancelled)
        self.timing["patchcore_predict"] += time.perf_counter() - t1
        self.pc_arms[arm][k][f] = summarize(labels, scores, masks, maps, ids=ids)

    def _seg(self, arm: str, k: int, f: int, items: list, feats: list, masks: list, seed: int,
             n_extra: int = 0) -> None:
        """Train the arm's segmenter on ``feats`` / ``masks`` (the last ``n_extra`` are synthetic
        defects added to real ones: drawn on top of the real batches, :func:`train_segmenter`) and
        score the fold."""
        import torch

        from pipelines.segmenter import TrainConfig, predict_maps, train_segmenter
        from pipelines.stats import summarize
        self.check()
        self.hashes["segmenter"] |= set(self.guard(f"segmenter's training set ({arm})", f, items))
        t1 = time.perf_counter()
        cfg = TrainConfig(steps=int(self.req.segmenter_steps), seed=seed)
        n = len(masks)
        model = train_segmenter(torch.cat(feats), list(masks), cfg, cancelled=self.cancelled,
                                extra=[i >= n - n_extra for i in range(n)] if n_extra else None)
        self.timing["segmenter_train"] += time.perf_counter() - t1
        _, masks_s, labels, ids, _ = self.scored[f]
        fold = self.d.folds[f]
        scores, maps = predict_maps(model, torch.cat([self.f_def[fold.evaluation], self.f_good]), int(self.req.size))
        self.seg_arms[arm][k][f] = summarize(labels, scores, masks_s, maps, ids=ids)

    def _fit_positive(self, f: int, items: list, imgs: list, masks: list) -> None:
        self.hashes["patchcore_positive_bank"] |= set(self.guard("PatchCore positive bank", f, items))
        t1 = time.perf_counter()
        self.pc.fit_positive(imgs, masks)
        self.timing["patchcore_fit"] += time.perf_counter() - t1

    def repeat(self, k: int) -> None:
        """Repeat ``k`` (seed S+k): the normal bank, then per fold the reference-only arms and
        every source."""
        from pipelines.patchcore import PatchCore
        req, d, seed_k = self.req, self.d, int(self.req.seed) + k
        self.check()
        self.unit(k, 0, "PatchCore normal bank")
        pc_kw = {} if req.coreset is None else {"coreset": float(req.coreset)}
        if req.positive_coreset is not None:
            pc_kw["positive_coreset"] = float(req.positive_coreset)
        self.pc = PatchCore(backbone=req.backbone, size=int(req.size), seed=seed_k, **pc_kw)
        self.hashes["patchcore_normal_bank"] |= set(self.guard("PatchCore normal bank", None, self.train_items))
        t0 = time.perf_counter()
        self.pc.fit(d.train, cancelled=self.cancelled)
        self.timing["patchcore_fit"] += time.perf_counter() - t0
        for f, fold in enumerate(d.folds):
            self._fold(k, f, fold, seed_k)
        del self.pc

    def _fold(self, k: int, f: int, fold: Fold, seed_k: int) -> None:
        d = self.d
        base = f * (2 + 3 * len(d.sources))
        where = f" fold {f + 1}/{len(d.folds)}" if len(d.folds) > 1 else ""
        ref_items = [(d.rel([i])[0], d.def_imgs[i]) for i in fold.reference]
        ref_imgs = [d.def_imgs[i] for i in fold.reference]
        ref_masks = [d.def_masks[i] for i in fold.reference]
        self.unit(k, base, f"PatchCore positive bank{where}")
        self._fit_positive(f, ref_items, ref_imgs, ref_masks)
        self._pc_score("reference_only", k, f)
        self.unit(k, base + 1, f"segmenter on reference defects{where}")
        f_ref = self.f_def[fold.reference]
        self._seg("reference_only", k, f, self.train_items + ref_items, [self.f_train, f_ref],
                  [*self.empty, *ref_masks], seed_k)
        self.fit_counts[f] = {"reference": len(ref_items), "train_good": len(self.train_items)}
        for j, src in enumerate(d.sources):
            self._source(k, f, fold, base + 2 + 3 * j, src, seed_k, ref_items, ref_imgs, ref_masks, f_ref)

    def _synthetic(self, k: int, f: int, fold: Fold, src: str) -> list[Synthetic]:
        d, req = self.d, self.req
        if src == "synthetic":
            return d.export
        plan = next(p for p in d.plans if p.name == src)
        if plan.is_auto:
            syn = self._auto(k, f, fold, plan)
        else:
            t1 = time.perf_counter()
            syn = synthesize(plan, d.train, d.train_hashes, d.reference(fold), d.mask_models[fold.index],
                             int(req.per_type), int(req.seed), k, req.strength, req.feather, self.cancelled,
                             fold=fold.index if len(d.folds) > 1 else None)
            self.timing["generate"] += time.perf_counter() - t1
        ev = {d.defect_hash(i) for i in fold.evaluation}
        R.check_descent([(s.name, s.ancestors) for s in syn], ev)
        return syn

    def _auto(self, k: int, f: int, fold: Fold, plan: GeneratorPlan) -> list[Synthetic]:
        """``auto``: per damage type, the candidate chosen on the fold's reference defects (once per
        fold, in the first repeat: :func:`pipelines.generators.choose.choose`, every array it
        trains on guarded against what the fold scores); its synthetic defects are the chosen
        generator's for the same base images, masks and seeds."""
        from pipelines.generators.choose import ChooseConfig, choose
        d, req = self.d, self.req
        refs = d.reference(fold)
        if f not in plan.choices:
            t1 = time.perf_counter()
            names = [c.name for c in plan.candidates]
            cfg = ChooseConfig(per_type=min(AUTO_PER_TYPE, int(req.per_type)),
                               steps=min(AUTO_STEPS, int(req.segmenter_steps)), size=int(req.size), seed=int(req.seed),
                               feather=int(req.feather), strength=float(req.strength))
            plan.choices[f] = {}
            for t, items in sorted(refs.items()):
                self.say(0.05, f"auto: choosing the generator for {t}{self._where(f)}")
                plan.choices[f][t] = choose(
                    t, [(img, m) for img, m, _ in items], d.train,
                    lambda learn, t=t: MaskSampler.fit(t, [m for _, m in learn], d.foreground, [i for i, _ in learn]),
                    self.fc, names, cfg,
                    guard=lambda what, items, f=f: self.guard(what, f, self.train_items + items),
                    cancelled=self.cancelled, goods_features=self.f_train,
                    others=[(img, m) for t2, its in sorted(refs.items()) if t2 != t for img, m, _ in its])
            self.timing["auto_choice"] = self.timing.get("auto_choice", 0.0) + time.perf_counter() - t1
        out: list[Synthetic] = []
        t1 = time.perf_counter()
        for t, choice in sorted(plan.choices[f].items()):
            chosen = next(c for c in plan.candidates if c.name == choice.generator)
            for s_ in synthesize(chosen, d.train, d.train_hashes, {t: refs[t]}, d.mask_models[fold.index],
                                 int(req.per_type), int(req.seed), k, req.strength, req.feather, self.cancelled,
                                 fold=fold.index if len(d.folds) > 1 else None):
                s_.name = f"auto:{s_.name}"
                out.append(s_)
        self.timing["generate"] += time.perf_counter() - t1
        return out

    def _added(self, f: int, src: str, syn: list[Synthetic]) -> list[int]:
        """Which of ``syn`` the reference + synthetic arm adds: all of them, except for ``auto``,
        which adds a type's only when its choice found that they helped on the fold's left-out
        reference defects (:attr:`pipelines.generators.choose.Choice.helps`)."""
        plan = next((p for p in self.d.plans if p.name == src), None)
        if plan is None or not plan.is_auto:
            return list(range(len(syn)))
        helps = {t for t, c in plan.choices.get(f, {}).items() if c.helps}
        return [i for i, s_ in enumerate(syn) if s_.label in helps]

    def _where(self, f: int) -> str:
        return f" (fold {f + 1}/{len(self.d.folds)})" if len(self.d.folds) > 1 else ""

    def _source(self, k: int, f: int, fold: Fold, unit: int, src: str, seed_k: int, ref_items, ref_imgs,
                ref_masks, f_ref) -> None:
        self.check()
        self.unit(k, unit, f"{src}: synthetic defects")
        syn = self._synthetic(k, f, fold, src)
        if not syn:
            raise ValueError(f"{src}: no synthetic defects (no damage type has reference defects)")
        self.counts[src] = max(self.counts.get(src, 0), len(syn))
        if k == 0 and f == 0:
            self.examples[src] = syn
        syn_items = [(s.name, s.image) for s in syn]
        syn_imgs, syn_masks = [s.image for s in syn], [s.mask for s in syn]
        self.unit(k, unit + 1, f"{src}: PatchCore positive bank")
        self._fit_positive(f, ref_items + syn_items, ref_imgs + syn_imgs, ref_masks + syn_masks)
        self._pc_score(f"{src}:reference_plus_synthetic", k, f)
        self.unit(k, unit + 2, f"{src}: segmenters")
        f_syn = self.fc.features(syn_imgs, self.cancelled)
        self._seg(f"{src}:synthetic_only", k, f, self.train_items + syn_items, [self.f_train, f_syn],
                  [*self.empty, *syn_masks], seed_k)
        add = self._added(f, src, syn)
        self._seg(f"{src}:reference_plus_synthetic", k, f, self.train_items + ref_items + [syn_items[i] for i in add],
                  [self.f_train, f_ref, f_syn[add]], [*self.empty, *ref_masks, *(syn_masks[i] for i in add)], seed_k,
                  n_extra=len(add))
        self.fit_counts[f][src] = len(syn_items)


    def fit_summary(self) -> list[dict]:
        """Per fold, from the hashes recorded where models were fit: how many of the fitted arrays
        are the fold's reference defects, its scored images (always 0: the guard refuses them),
        train/good, and the synthetic samples per source (counts of the largest repeat)."""
        from pipelines.roles import pixel_hash
        d = self.d
        out = []
        for f, fold in enumerate(d.folds):
            fit = self.fold_hashes[f]
            ref = {pixel_hash(d.def_imgs[i]) for i in fold.reference}
            scored = {pixel_hash(img) for img in self.scored[f][0]}
            out.append({"reference": len(fit & ref), "evaluation": len(fit & scored),
                        "train_good": len(fit & {pixel_hash(t) for t in d.train}),
                        "synthetic": {k: v for k, v in self.fit_counts[f].items()
                                      if k not in ("reference", "train_good")}})
        return out


def run_protocol(req: ExperimentRequest, progress: ProgressFn | None = None,
                 cancelled: CancelFn | None = None) -> tuple[Protocol, Runs]:
    """Load the data and run every repeat and fold (the models' scores, no statistics yet)."""
    import torch

    from pipelines.backbones import build_backbone
    from pipelines.patchcore import Cancelled as PatchCoreCancelled
    from pipelines.segmenter import FeatureCache

    say = progress or (lambda f, m="": None)
    d = load_protocol(req, say)
    run = Runs(req, d, say, cancelled)
    with deterministic(int(req.threads)), torch.random.fork_rng(devices=[]), as_cancelled(PatchCoreCancelled):
        torch.manual_seed(int(req.seed))
        run.features(FeatureCache(build_backbone(req.backbone)))
        for k in range(int(req.repeats)):
            run.repeat(k)
    return d, run


__all__ = ["Protocol", "Runs", "load_protocol", "run_protocol", "deterministic", "as_cancelled"]
