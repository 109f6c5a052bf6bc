"""What "auto" runs for a damage type: the generator whose synthetic defects, *added to the
product's own reference defects*, best help a segmenter find the reference defects of that type
left out in turn — never an evaluation image. Whether they help at all is part of the answer.

For a damage type with ``n >= 2`` reference defects (image + mask) the reference defects are
split into ``k = min(splits, n)`` groups (leave-one-out when ``n <= splits``). For each group
``j`` and each candidate generator:

1. the generator learns only from the *other* groups: its donors / profiles / fitted motions
   (``donors``) and the mask shapes and placement (``sampler_for``, fitted on them);
2. it makes ``per_type`` synthetic defects of the type on the product's good images — the base
   image, mask and seed of item ``i`` depend on ``(seed, j, i)`` only, so every candidate gets
   the same inputs; each is labelled where it visibly changed its mask
   (:func:`pipelines.masks.visible_label`, as the experiment labels them);
3. a :mod:`pipelines.segmenter` (frozen backbone features, the experiment's detector) is trained
   on the other groups' reference defects plus the good images (empty masks) and the reference
   defects of the product's other damage types (``others``, as the experiment's segmenter learns
   every type at once) — the baseline —
   and once more with the candidate's synthetic defects added on top (``extra``, as the
   experiment's reference + synthetic arm); both score the left-out group's images plus the
   good images held out of training (every 4th, rotating with the group): pixel AP.

The candidate with the highest mean *gain* (its AP minus the baseline's, over the groups) is
the choice (ties within ``TIE`` go to the earlier candidate: the registry's order);
:attr:`Choice.helps` says whether that gain is real: above ``TIE`` *and* above its own standard
error over the left-out groups (with two groups: positive in both). The best of several noisy
gains is biased upwards (the winner's curse); with a handful of reference defects one lucky
group would otherwise decide. The experiment's ``auto`` adds the synthetic defects of a type
only when its choice helps, so a type no generator helps gets none. A type with fewer than 2 reference
defects has nothing to leave out: the registry's fixed rule (:func:`pipelines.registry.auto_choice`)
decides, and the choice says so. Candidates exclude generators that learned from data outside
this loop (a trained model — its training set may hold the left-out defects — or hub weights).

Cost (2 cores, EfficientNet-Lite0 at 256 px, 6 candidates, 3 groups, 6 samples, 100 steps):
about 1 min per damage type; :mod:`studio.auto` caches the result per product.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from pipelines.masks import visible_label
from pipelines.training import CancelFn, ProgressFn, check_cancelled

TIE = 1e-3            # AP differences below this are ties (the earlier candidate wins)
VERSION = "5"         # of the procedure; a cached choice of another version is recomputed


@dataclass
class ChooseConfig:
    per_type: int = 6           # synthetic defects per candidate and left-out group
    splits: int = 3             # at most this many left-out groups (leave-one-out below)
    steps: int = 100            # segmenter training steps
    size: int = 256             # images are resized to size × size for the measurement
    seed: int = 0
    feather: int = 4
    strength: float = 0.8


@dataclass
class Choice:
    """The generator "auto" runs for one damage type, and why."""
    damage_type: str
    generator: str
    ap: float | None                    # mean pixel AP on left-out reference defects with its synthetic
                                        # defects added (None: fixed rule)
    scores: dict[str, float] = field(default_factory=dict)   # every candidate's mean AP (same)
    n_reference: int = 0
    splits: int = 0
    version: str = VERSION
    baseline: float | None = None       # the same AP with the reference defects alone
    gains: list[float] = field(default_factory=list)   # the choice's gain per left-out group

    @property
    def measured(self) -> bool:
        return self.ap is not None

    @property
    def gain(self) -> float | None:
        return None if self.ap is None or self.baseline is None else self.ap - self.baseline

    @property
    def gain_se(self) -> float | None:
        """The standard error of :attr:`gain` over the left-out groups (None below two)."""
        if len(self.gains) < 2:
            return None
        return float(np.std(self.gains, ddof=1) / np.sqrt(len(self.gains)))

    @property
    def helps(self) -> bool:
        """Its synthetic defects added to the reference defects found the left-out ones better:
        the mean gain is above ``TIE`` and above its standard error over the groups."""
        if self.gain is None or self.gain <= TIE:
            return False
        se = self.gain_se
        return se is None or self.gain > se

    def caption(self, product: str | None = None) -> str:
        """One line for the candidate caption, e.g. "stroke — best for crack on this product (AP
        0.71 on left-out reference defects)"."""
        where = "on this product" if product is None else f"on {product}"
        if not self.measured:
            return (f"{self.generator} — fixed rule for {self.damage_type} (only {self.n_reference} reference "
                    f"defect{'s' * (self.n_reference != 1)}: nothing to leave out)")
        base = self.baseline if self.baseline is not None else 0.0
        runner = sorted(((v, k) for k, v in self.scores.items() if k != self.generator), reverse=True)
        nxt = f"; next {runner[0][1]} {runner[0][0] - base:+.2f}" if runner else ""
        if self.helps:
            head = f"{self.generator} — best for {self.damage_type} {where}"
        elif self.gain > TIE:
            head = (f"{self.generator} — best for {self.damage_type} {where}, but its gain is within "
                    f"its spread over the left-out groups (±{self.gain_se:.2f}): not added")
        else:
            head = f"{self.generator} — least harm for {self.damage_type} {where}, no generator helped"
        return (f"{head} ({self.gain:+.2f} AP over the reference defects alone ({base:.2f}) on "
                f"{self.n_reference} left-out reference defects{nxt})")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Choice":
        return cls(**{k: d[k] for k in ("damage_type", "generator", "ap", "scores", "n_reference", "splits",
                                        "version", "baseline", "gains") if k in d})


def candidates(names: Sequence[str] | None = None) -> list[str]:
    """Generators "auto" may choose from: offline damage generators that make a defect inside the
    mask and learned from nothing outside the leave-out loop (no hub weights, no trained model:
    ``needs_model`` / ``learns_from_data`` / a per-product model are excluded)."""
    from pipelines.registry import generator_names, get_info, offline_names, picks_model
    pool = offline_names("damage") if names is None else [n for n in names if n in generator_names("damage")]
    out = []
    for n in pool:
        info = get_info(n)
        if info.needs_model or info.full_image or info.learns_from_data or picks_model(n):
            continue
        out.append(n)
    return out


def groups(n: int, splits: int) -> list[list[int]]:
    """``n`` reference defects → ``min(splits, n)`` left-out groups (round robin)."""
    k = max(1, min(int(splits), n))
    return [[i for i in range(n) if i % k == j] for j in range(k)]


def resize_to(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _synthetic(name: str, damage_type: str, learn, goods, sampler, cfg: ChooseConfig, j: int,
               cancelled: CancelFn | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from pipelines.registry import get_generator, get_info
    gen, info = get_generator(name), get_info(name)
    params = info.call_params(damage_type, [(img, m.astype(np.uint8) * 255) for img, m in learn], goods,
                              cfg.strength, cfg.feather)
    imgs, masks = [], []
    for i in range(int(cfg.per_type)):
        check_cancelled(cancelled, "auto choice")
        rng = np.random.default_rng([int(cfg.seed), int(j), i])
        base = goods[int(rng.integers(len(goods)))]
        mask = sampler.sample(base.shape[:2], rng, image=base)
        img = np.ascontiguousarray(gen(base, mask.astype(np.uint8) * 255, seed=int(rng.integers(2 ** 31 - 1)),
                                       **params))
        imgs.append(img)
        masks.append(visible_label(base, img, mask))
    return imgs, masks


def _goods_split(n: int, j: int) -> tuple[list[int], list[int]]:
    """Good images ``(fitted, held out)`` for left-out group ``j``: every 4th (offset ``j``) is held
    out and scored beside the left-out defects (so false alarms count) when there are at least 8."""
    held = [g for g in range(n) if g % 4 == j % 4] if n >= 8 else []
    return [g for g in range(n) if g not in held], held


def choose(damage_type: str, references: Sequence[tuple[np.ndarray, np.ndarray]], goods: Sequence[np.ndarray],
           sampler_for: Callable[[list[np.ndarray]], object], features, names: Sequence[str] | None = None,
           cfg: ChooseConfig | None = None, guard: Callable[[str, list], object] | None = None,
           progress: ProgressFn | None = None, cancelled: CancelFn | None = None,
           goods_features=None, others: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> Choice:
    """The :class:`Choice` for ``damage_type`` (module docstring).

    ``references``: the type's reference defects ``[(image H×W×3 uint8, mask H×W)]`` — never an
    evaluation image (the caller's roles decide; ``guard(what, [(name, image)])`` is called on
    every array a segmenter is trained on, so the caller can refuse copies of scored images).
    ``goods``: the product's defect-free train images (the base images and the negatives).
    ``sampler_for(learn)`` → an object with ``sample(shape, rng, image=base) -> H×W bool``
    fitted on the learning references ``[(image, mask)]``. ``features``: a :class:`pipelines.segmenter.FeatureCache`; ``goods_features``
    its features of ``goods`` at ``cfg.size`` when already computed. ``others``: the reference
    defects of the product's *other* damage types ``[(image, mask)]`` — in every segmenter's
    training set (baseline and candidates alike), never scored — so the gain measured is the
    one the experiment asks about: synthetic defects of this type added to a segmenter that
    already learns every type's reference defects (alone, with one or two real positives, almost
    any synthetic defect helps; beside the other types' real ones, far fewer do)."""
    import torch

    from pipelines.metrics import pixel_ap
    from pipelines.registry import auto_choice
    from pipelines.segmenter import TrainConfig, predict_maps, train_segmenter
    cfg = cfg or ChooseConfig()
    S = int(cfg.size)
    refs = [(resize_to(np.asarray(i), S), resize_to((np.asarray(m) > 0).astype(np.uint8), S, True) > 0)
            for i, m in references]
    refs = [(i, m) for i, m in refs if m.any()]
    names = candidates(names)
    if len(refs) < 2 or not names or not goods or features is None:
        fixed = auto_choice("damage", have_donors=bool(refs)) or (names[0] if names else "perlin")
        return Choice(damage_type, fixed, None, {}, len(refs), 0)
    goods = [resize_to(np.asarray(g), S) for g in goods]
    f_goods = goods_features if goods_features is not None else features.features(goods, cancelled)
    parts = groups(len(refs), cfg.splits)
    f_refs = features.features([i for i, _ in refs], cancelled)
    oth = [(resize_to(np.asarray(i), S), resize_to((np.asarray(m) > 0).astype(np.uint8), S, True) > 0)
           for i, m in others]
    oth = [(i, m) for i, m in oth if m.any()]
    f_oth = features.features([i for i, _ in oth], cancelled) if oth else f_goods[:0]
    if oth and guard is not None:
        guard(f"auto choice for {damage_type} (the other types' reference defects)",
              [(f"other/{i}", im) for i, (im, _) in enumerate(oth)])
    scores: dict[str, list[float]] = {n: [] for n in names}
    base_aps: list[float] = []
    total = len(parts) * len(names)
    for j, held in enumerate(parts):
        learn_idx = [i for i in range(len(refs)) if i not in held]
        learn = [refs[i] for i in learn_idx]
        sampler = sampler_for(learn)
        g_fit, g_held = _goods_split(len(goods), j)
        real_f = torch.cat([f_goods[g_fit], f_oth, f_refs[learn_idx]])
        real_m = [np.zeros((S, S), bool)] * len(g_fit) + [m for _, m in oth] + [m for _, m in learn]
        score_f = torch.cat([f_refs[held], f_goods[g_held]])
        score_m = np.stack([refs[i][1] for i in held] + [np.zeros((S, S), bool)] * len(g_held))
        tcfg = TrainConfig(steps=int(cfg.steps), seed=int(cfg.seed) + j)

        def ap_of(model) -> float:
            return float(pixel_ap(score_m, predict_maps(model, score_f, S)[1]))

        base_aps.append(ap_of(train_segmenter(real_f, real_m, tcfg, cancelled=cancelled)))
        for c, name in enumerate(names):
            if progress:
                progress((j * len(names) + c) / total, f"auto for {damage_type}: {name}, left-out group {j + 1}/{len(parts)}")
            imgs, masks = _synthetic(name, damage_type, learn, [goods[g] for g in g_fit], sampler, cfg, j, cancelled)
            if guard is not None:
                guard(f"auto choice for {damage_type} ({name})", [(f"{name}/{j}/{i}", im) for i, im in enumerate(imgs)])
            model = train_segmenter(torch.cat([real_f, features.features(imgs, cancelled)]), real_m + masks, tcfg,
                                    cancelled=cancelled, extra=[False] * len(real_m) + [True] * len(masks))
            scores[name].append(ap_of(model))
    mean = {n: float(np.mean(v)) for n, v in scores.items()}
    best = names[0]
    for n in names[1:]:
        if mean[n] > mean[best] + TIE:
            best = n
    if progress:
        progress(1.0, f"auto for {damage_type}: {best}")
    return Choice(damage_type, best, mean[best], mean, len(refs), len(parts), baseline=float(np.mean(base_aps)),
                  gains=[float(a - b) for a, b in zip(scores[best], base_aps)])


__all__ = ["Choice", "ChooseConfig", "choose", "candidates", "groups", "resize_to", "TIE", "VERSION"]
