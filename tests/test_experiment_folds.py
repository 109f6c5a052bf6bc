"""Cross-fitting in the experiment: every real defect is scored once, by models that learned
nothing from it in its fold — checked on the hashes the guard returned for the arrays that were
actually fitted — plus the guard at the point of fitting (a JPEG copy of a scored image planted in
a synthetic set is refused, naming it), Holm-adjusted verdicts and exploratory per-type rows."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.mvtec import load_category, load_image
from pipelines.roles import LeakageError, folder_roles, pixel_hash
from studio import experiment as E
from studio.experiment import ExperimentRequest, run_experiment
from studio.experiment.folds import default_folds, make_folds

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
FAST = dict(repeats=2, per_type=2, backbone="random", size=64, coreset=0.05, segmenter_steps=20, n_boot=200)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    out = tmp_path_factory.mktemp("folds")
    return run_experiment(ExperimentRequest(data=str(DEMO / "bottle"), out=str(out), generate="perlin", **FAST)), out


def test_folds_rotate_so_every_real_defect_is_scored_exactly_once(folded):
    r, out = folded
    cat = load_category(DEMO / "bottle")
    defects = [s for s in cat.test if s.is_anomaly]
    fd = r["protocol"]["folds"]
    assert fd["k"] == 3 and fd["source"] == "cross-fitting"
    scored = [f for x in fd["lists"] for f in x["evaluation"]]
    assert sorted(scored) == sorted(str(s.path.relative_to(DEMO / "bottle")) for s in defects)
    assert len(scored) == len(set(scored))                       # once each
    for x in fd["lists"]:
        assert not set(x["reference"]) & set(x["evaluation"])
        assert x["fit"]["evaluation"] == 0 and x["fit"]["reference"] == len(x["reference"])
    # the product's roles are untouched
    roles = folder_roles(DEMO / "bottle")
    assert r["protocol"]["product_roles"]["evaluation"] == roles.rel(roles.evaluation)
    report = (out / "report.md").read_text()
    assert "Cross-fitting: 3 folds" in report and "0 evaluation" in report


def test_no_fold_fitted_an_array_it_scores(folded):
    """From the hashes of the arrays each model was fitted on: a fold's scored images (at the
    run's size, as they were scored) are never among what that fold fitted."""
    r, _ = folded
    S = r["protocol"]["size"]
    for x in r["protocol"]["folds"]["lists"]:
        fitted = set(x["fit_hashes"])
        scored = {pixel_hash(load_image(DEMO / "bottle" / f, S)) for f in x["evaluation"]}
        reference = {pixel_hash(load_image(DEMO / "bottle" / f, S)) for f in x["reference"]}
        assert scored and not fitted & scored
        assert reference <= fitted


def test_verdicts_are_holm_adjusted_and_per_type_rows_exploratory(folded):
    r, out = folded
    mc = r["protocol"]["multiple_comparisons"]
    assert mc["method"] == "holm" and mc["family_size"] >= 12
    for name in ("delta", "delta_synthetic_only"):
        for v in r["segmenter"][name].values():
            assert v["family_size"] == mc["family_size"] and 0 <= v["p_normal"] <= v["p_holm"] <= 1
            lo, hi = v["ci_adjusted"]
            assert v["verdict"] == ("helped" if lo > 0 else "hurt" if hi < 0 else "no detectable effect")
            assert v["level"] >= 0.95 and lo <= v["mean"] <= hi
    for t, row in r["by_type"].items():
        assert row["exploratory"] and row["n_evaluation"] == 5
        assert row["segmenter"]["delta"]["pixel_ap"]["verdict"] is not None       # 5 ≥ 3 scored defects
        assert row["segmenter"]["delta"]["aupro"]["verdict"] is None              # other metrics: interval only
    assert "Holm-adjusted" in (out / "report.md").read_text()
    assert "draws" not in json.dumps(r)


def test_folds_one_is_the_products_roles(tmp_path):
    r = run_experiment(ExperimentRequest(data=str(DEMO / "bottle"), out=str(tmp_path), generate="perlin",
                                         folds=1, **{**FAST, "repeats": 1}))
    roles = folder_roles(DEMO / "bottle")
    assert r["protocol"]["folds"]["k"] == 1
    assert r["protocol"]["evaluation"] == roles.rel(roles.evaluation)


def test_default_folds_need_three_defects_per_type():
    cat = load_category(DEMO / "bottle")
    defects = [s for s in cat.test if s.is_anomaly]
    roles = folder_roles(DEMO / "bottle")
    assert default_folds(defects, roles.hashes) == 3
    assert default_folds(defects[:2] + defects[5:], roles.hashes) == 1          # a type with 2
    folds = make_folds(defects, roles.hashes, 3)
    again = make_folds(list(reversed(defects)), roles.hashes, 3)                # order-free: pixels decide
    as_paths = lambda fs, ds: [sorted(str(ds[i].path) for i in f.evaluation) for f in fs]
    assert as_paths(folds, defects) == as_paths(again, list(reversed(defects)))


def _jpeg(arr: np.ndarray, q: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_a_scored_image_planted_in_a_synthetic_set_is_refused_where_it_is_fitted(tmp_path, monkeypatch):
    """Canary: whatever route made it, a JPEG copy of an image the fold scores never reaches a fit."""
    real = E.protocol.synthesize

    def leaky(plan, train, train_hashes, reference, masks, per_type, seed, repeat, strength, feather,
              cancelled=None, fold=None):
        out = real(plan, train, train_hashes, reference, masks, per_type, seed, repeat, strength, feather,
                   cancelled, fold=fold)
        good = load_image(DEMO / "bottle" / "test" / "good" / "003.png", 64)   # always scored
        out[0] = E.Synthetic(_jpeg(good), out[0].mask, out[0].label, "planted/jpeg-copy", "x", [])
        return out

    monkeypatch.setattr(E.protocol, "synthesize", leaky)
    with pytest.raises(LeakageError, match=r"planted/jpeg-copy.*test/good/003\.png"):
        run_experiment(ExperimentRequest(data=str(DEMO / "bottle"), out=str(tmp_path), generate="perlin",
                                         **{**FAST, "repeats": 1}))
    assert not (tmp_path / "metrics.json").exists()
