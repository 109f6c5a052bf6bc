"""``auto`` per damage type: the generator whose synthetic defects, added to the product's own
reference defects, best help find the ones left out in turn (pipelines.generators.choose) — and
whether they help at all —, cached per product
(studio.auto), said in the caption — and never reading an evaluation image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import masks as mk
from pipelines import registry
from pipelines.backbones import build_backbone
from pipelines.generator import GeneratorBase, GeneratorInfo
from pipelines.generators.choose import Choice, ChooseConfig, choose, groups
from pipelines.roles import pixel_hash
from pipelines.segmenter import FeatureCache
from studio.auto import cache_path
from studio.services import GenerateRequest, generate, learned_from

ROOT = Path(__file__).resolve().parent.parent
S = 64


class Yellow(GeneratorBase):
    """Paints the mask the reference defects' colour: the right generator for the toy."""
    info = GeneratorInfo("toy-yellow", "1", "damage", "bright yellow fill (test toy)")

    def __call__(self, image, mask, *, seed, feather=4, damage_type=None, strength=1.0):
        out = np.asarray(image).copy()
        out[mk.validate_mask(mask, out.shape) > 0] = (235, 225, 60)
        return out


class Faint(GeneratorBase):
    """Changes the masked pixels by one grey level: nothing a segmenter can learn from."""
    info = GeneratorInfo("toy-faint", "1", "damage", "one grey level (test toy)")

    def __call__(self, image, mask, *, seed, feather=4, damage_type=None, strength=1.0):
        out = np.asarray(image).copy()
        m = mk.validate_mask(mask, out.shape) > 0
        out[m] = np.clip(out[m].astype(int) + 1, 0, 255).astype(np.uint8)
        return out


@pytest.fixture()
def toys():
    for name, cls in (("toy-faint", Faint), ("toy-yellow", Yellow)):
        registry.register(name, f"{__name__}:{cls.__name__}")
    yield ["toy-faint", "toy-yellow"]
    for name in ("toy-faint", "toy-yellow"):
        registry.unregister(name)


def _texture(rng, n):
    return [np.clip(rng.normal(110, 18, (S, S, 1)), 0, 255).repeat(3, 2).astype(np.uint8) for _ in range(n)]


def _square(img, rng):
    m = np.zeros((S, S), bool)
    y, x = rng.integers(4, S - 24, 2)
    m[y:y + 20, x:x + 20] = True
    out = img.copy()
    out[m] = (235, 225, 60)
    return out, m


class Box:
    """A sampler of square masks (as a shape model fitted on square reference masks)."""

    def __init__(self, learn):
        self.side = int(round(np.sqrt(np.mean([m.sum() for _, m in learn]))))

    def sample(self, shape, rng, image=None):
        m = np.zeros(shape, bool)
        y, x = rng.integers(2, shape[0] - self.side - 2, 2)
        m[y:y + self.side, x:x + self.side] = True
        return m


def test_the_generator_that_looks_like_the_reference_defects_is_chosen(toys):
    rng = np.random.default_rng(0)
    goods = _texture(rng, 12)
    refs = [_square(img, rng) for img in _texture(rng, 4)]
    fc = FeatureCache(build_backbone("random"))
    cfg = ChooseConfig(per_type=4, splits=2, steps=60, size=S)
    seen: list[int] = []
    c = choose("stain", refs, goods, Box, fc, toys, cfg, guard=lambda what, items: seen.append(len(items)))
    assert c.generator == "toy-yellow" and c.measured and c.n_reference == 4 and c.splits == 2
    # yellow squares added to the reference defects help find the left-out ones; labelling
    # one-grey-level changes as defects does not (it teaches the segmenter nothing true)
    assert c.helps and c.gain > 0 and c.baseline is not None
    assert c.scores["toy-yellow"] > c.scores["toy-faint"] + 0.01 and c.scores["toy-faint"] - c.baseline < c.gain
    assert seen == [4] * 4                         # every synthetic set fitted passed the guard
    assert "toy-yellow — best for stain" in c.caption() and "left-out reference defects" in c.caption()
    assert "over the reference defects alone" in c.caption()
    # a choice where nothing helped says so
    worse = Choice("stain", "toy-faint", 0.10, {"toy-faint": 0.10}, 4, 2, baseline=0.20)
    # a mean gain that one lucky left-out group made is not "helps" (within its standard error)
    lucky = Choice("stain", "toy-yellow", 0.25, {"toy-yellow": 0.25}, 4, 2, baseline=0.20, gains=[0.12, -0.02])
    assert lucky.gain > 0 and not lucky.helps and "not added" in lucky.caption()
    steady = Choice("stain", "toy-yellow", 0.25, {"toy-yellow": 0.25}, 4, 2, baseline=0.20, gains=[0.06, 0.04])
    assert steady.helps and "best for stain" in steady.caption()
    assert not worse.helps and "no generator helped" in worse.caption()
    assert Choice.from_json(json.loads(json.dumps(c.to_json()))) == c
    # one reference defect: nothing to leave out, the registry's fixed rule, said as such
    one = choose("stain", refs[:1], goods, Box, fc, toys, cfg)
    assert not one.measured and "fixed rule" in one.caption()
    assert groups(5, 3) == [[0, 3], [1, 4], [2]] and groups(2, 3) == [[0], [1]]


def _blue_square(img, rng):
    out, m = _square(img, rng)
    out[m] = (40, 60, 230)
    return out, m


def test_the_other_types_reference_defects_train_in_both_arms_and_pass_the_guard(toys):
    """``others`` (the product's other damage types' reference defects) are in the baseline's and
    every candidate's training set, as in the experiment's segmenter, and go through the guard;
    the right generator still helps beside them."""
    rng = np.random.default_rng(0)
    goods = _texture(rng, 12)
    refs = [_square(img, rng) for img in _texture(rng, 4)]
    others = [_blue_square(img, rng) for img in _texture(rng, 3)]
    fc = FeatureCache(build_backbone("random"))
    cfg = ChooseConfig(per_type=4, splits=2, steps=60, size=S)
    seen: list[str] = []
    c = choose("stain", refs, goods, Box, fc, toys, cfg, guard=lambda what, items: seen.append(what),
               others=others)
    alone = choose("stain", refs, goods, Box, fc, toys, cfg)
    assert any("other types" in w for w in seen)
    assert c.generator == "toy-yellow" and c.helps
    assert c.baseline != alone.baseline             # the others changed what the baseline learned


def test_candidates_exclude_generators_that_learned_from_a_trained_model():
    from pipelines.generators.choose import candidates
    names = candidates()
    assert {"perlin", "cutpaste", "stroke", "warp", "remove"} <= set(names)
    assert "pixel-inpaint" not in names and "sd-inpaint" not in names and "wall-lab" not in names


@pytest.fixture()
def store(bottle_store):
    return bottle_store


def _request(store, n=2):
    row = store.list_images(product="bottle", split="train")[0]
    img = store.load_image(row["id"])
    m = np.zeros(img.shape[:2], np.uint8)
    m[50:90, 120:170] = 255
    return GenerateRequest(image=img, mask=m, damage_type="contamination", product="bottle", n=n, seed=1,
                           source_image_id=row["id"])


def test_auto_in_the_studio_chooses_per_type_caches_and_says_why(store, monkeypatch):
    import pipelines.generators.choose as CH
    import pipelines.segmenter as SEG
    evaluation = {r["sha256"] for r in store.list_images(product="bottle", role="evaluation")} | \
        {r["sha256"] for r in store.list_images(product="bottle", split="test", label="good")}
    fed: list[str] = []
    real_features = SEG.FeatureCache.features

    def spy(self, images, cancelled=None):          # every image the measurement decodes features of
        fed.extend(pixel_hash(np.asarray(i)) for i in images)
        return real_features(self, images, cancelled)

    monkeypatch.setattr(SEG.FeatureCache, "features", spy)
    cands = generate(_request(store), store=store)
    path = cache_path(store.root, "bottle")
    cached = json.loads(path.read_text())["contamination"]["choice"]
    assert cached["ap"] is not None and cached["n_reference"] == 2
    assert [c.generator for c in cands] == [cached["generator"]] * 2
    assert all("for contamination on bottle" in c.params["auto"] for c in cands)
    assert cached["baseline"] is not None
    row = store.get_sample(cands[0].sample_id)
    assert "for contamination on bottle" in row["params"]["auto"]
    text = learned_from(store, "bottle", row["generator"], "contamination", row["params"])
    assert text.startswith("auto chose ") and "left-out reference defects" in text
    # canary: the references scored in the measurement were reference defects, never an
    # evaluation image (decoded pixels at 64 px are compared with the store's hashes at full size,
    # so the spy compares against resized copies of every evaluation / test-good image too)
    from pipelines.generators.choose import resize_to
    scored_small = {pixel_hash(resize_to(store.load_image(r["id"]), S))
                    for r in store.list_images(product="bottle", role="evaluation")
                    + store.list_images(product="bottle", split="test", label="good")}
    assert fed and not (set(fed) & (evaluation | scored_small))
    # the second time it is read from the cache: nothing is measured
    monkeypatch.setattr(CH, "choose", lambda *a, **k: pytest.fail("measured again"))
    import studio.auto as AUTO
    monkeypatch.setattr(AUTO, "choose", lambda *a, **k: pytest.fail("measured again"))
    again = generate(_request(store, n=1), store=store)
    assert again[0].generator == cached["generator"]
    # another reference defect changes what the choice depends on: it is measured again
    ev = store.list_images(product="bottle", label="contamination", role="evaluation")[0]
    store.set_role(ev["id"], "reference")
    with pytest.raises(pytest.fail.Exception, match="measured again"):
        generate(_request(store, n=1), store=store)


def test_a_named_backend_is_not_replaced_by_the_choice(store):
    req = _request(store, n=1)
    req.backend = "perlin"
    c = generate(req, store=store)[0]
    assert c.generator == "perlin" and "auto" not in c.params
    assert not cache_path(store.root, "bottle").exists()


def test_auto_in_the_experiment_is_the_chosen_generator_per_type(tmp_path):
    """The experiment's ``auto`` source: per fold and type, a choice made on that fold's
    reference defects; its synthetic defects of a type are exactly those of the chosen
    generator (same base images, masks, seeds), and metrics.json records the choices."""
    from studio.experiment import ExperimentRequest
    from studio.experiment.protocol import run_protocol
    req = ExperimentRequest(data=str(ROOT / "assets" / "demo" / "bottle"), out=str(tmp_path / "o"),
                            generate="perlin,cutpaste,auto", repeats=1, per_type=2, backbone="random", size=64,
                            coreset=0.05, segmenter_steps=20, n_boot=200, folds=1)
    d, run = run_protocol(req)
    plan = next(p for p in d.plans if p.name == "auto")
    assert [c.name for c in plan.candidates] == ["perlin", "cutpaste"]
    choices = plan.choices[0]
    assert set(choices) == {s.label for s in d.roles.reference}
    for t, c in choices.items():
        assert c.generator in ("perlin", "cutpaste") and c.measured
        auto = [s.sha for s in run.examples["auto"] if s.label == t]
        chosen = [s.sha for s in run.examples[c.generator] if s.label == t]
        assert auto == chosen and len(auto) == 2
    prov = plan.provenance()
    assert prov["candidates"] == ["perlin", "cutpaste"] and set(prov["choices"]["0"]) == set(choices)


def test_auto_adds_a_type_only_where_its_choice_helped(tmp_path, monkeypatch):
    """Where no candidate's synthetic defects helped on the fold's left-out reference defects,
    the experiment's ``auto`` adds nothing: its reference + synthetic segmenter is exactly the
    reference-only one (same inputs, same seed), while its synthetic-only arm still trains."""
    from pipelines.generators.choose import Choice as C
    from studio.experiment import ExperimentRequest
    from studio.experiment.protocol import run_protocol
    monkeypatch.setattr(C, "helps", property(lambda self: False))
    req = ExperimentRequest(data=str(ROOT / "assets" / "demo" / "bottle"), out=str(tmp_path / "o"),
                            generate="perlin,cutpaste,auto", repeats=1, per_type=2, backbone="random", size=64,
                            coreset=0.05, segmenter_steps=20, n_boot=200, folds=1)
    d, run = run_protocol(req)
    ref, added = run.seg_arms["reference_only"][0][0], run.seg_arms["auto:reference_plus_synthetic"][0][0]
    assert np.allclose(ref.scores, added.scores, rtol=0, atol=2e-5)   # (float rounding of a concatenation)
    other = run.seg_arms["perlin:reference_plus_synthetic"][0][0]
    assert np.abs(ref.scores - other.scores).max() > 1e-4     # a source that adds changes the segmenter
    assert run.seg_arms["auto:synthetic_only"][0][0] is not None
