"""The experiment protocol on the demo data (random-init backbone, K = 2, tiny per-type): the
metrics.json blocks, no evaluation image in any training set (by pixel hash), determinism, masks
from the reference shapes on the product, and the refusal of a leaking --synthetic export."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.mvtec import load_category, load_image, load_mask
from pipelines.roles import file_pixel_hash, folder_roles, pixel_hash
from studio.experiment import ExperimentRequest, MaskSampler, resolve_generators, run_experiment

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
FAST = dict(repeats=2, per_type=2, backbone="random", size=64, coreset=0.05, segmenter_steps=20, n_boot=200,
            folds=1)   # the product's roles (cross-fitting: tests/test_experiment_folds.py)
METRICS = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc")


def _is_interval(v) -> bool:
    return set(v) >= {"mean", "ci95"} and len(v["ci95"]) == 2 and v["ci95"][0] <= v["ci95"][1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    req = lambda name: ExperimentRequest(data=str(DEMO / "bottle"), out=str(out / name),
                                         generate="perlin,cutpaste", **FAST)
    return run_experiment(req("a")), run_experiment(req("b")), out


def test_blocks_verdicts_and_protocol(runs):
    r, _, out = runs
    roles = folder_roles(DEMO / "bottle")
    assert r["protocol"]["evaluation"] == roles.rel(roles.evaluation)
    assert r["protocol"]["reference"] == roles.rel(roles.reference)
    assert r["protocol"]["repeats"] == 2 and r["protocol"]["seed"] == 0
    assert set(r["backends"]) == {"perlin", "cutpaste"} and r["source"] == "perlin"
    for block in (r, *r["backends"].values()):
        assert set(block["patchcore"]) >= {"reference_only", "reference_plus_synthetic", "delta"}
        assert set(block["segmenter"]) >= {"synthetic_only", "reference_only", "reference_plus_synthetic", "delta"}
        for arms in (block["patchcore"], block["segmenter"]):
            for arm, metrics in arms.items():
                assert set(metrics) == set(METRICS), arm
                assert all(_is_interval(v) for v in metrics.values()), arm
        for d in (block["patchcore"]["delta"], block["segmenter"]["delta"]):
            for v in d.values():
                lo, hi = v["ci_adjusted"]                    # Holm-adjusted over the run's family
                assert v["verdict"] == ("helped" if lo > 0 else "hurt" if hi < 0 else "no detectable effect")
        assert block["verdict"]["patchcore"] in ("helped", "no detectable effect", "hurt")
    assert r["patchcore"] == r["backends"]["perlin"]["patchcore"]
    assert set(r["real_only"]) == set(METRICS)          # backward compatible means of arm A
    assert r["delta"]["pixel_ap"] == pytest.approx(r["with_synthetic"]["pixel_ap"] - r["real_only"]["pixel_ap"])
    assert r["n_synthetic"] == 2 * 3                     # per type × the bottle's three types
    assert (out / "a" / "report.md").read_text().startswith("# Did synthetic data help?")
    assert "| segmenter | delta |" in (out / "a" / "report.md").read_text()
    assert (out / "a" / "figure.html").stat().st_size > 10_000
    assert {p.name for p in (out / "a" / "samples").iterdir()} == {"perlin.png", "cutpaste.png"}
    assert json.loads((out / "a" / "metrics.json").read_text())["verdict"] == r["verdict"]
    # per damage type: every evaluated type, its own evaluation defects + the good images
    types = sorted({s.label for s in roles.evaluation})
    for block in (r, *r["backends"].values()):
        assert sorted(block["by_type"]) == types
        for t, b in block["by_type"].items():
            assert b["n_evaluation"] == sum(s.label == t for s in roles.evaluation)
            assert _is_interval(b["segmenter"]["synthetic_only"]["pixel_ap"])
            assert b["patchcore"]["delta"]["pixel_ap"]["verdict"] in ("helped", "no detectable effect", "hurt")
    assert "## Per damage type" in (out / "a" / "report.md").read_text()


def test_no_training_set_holds_an_evaluation_image(runs):
    r, _, _ = runs
    roles = folder_roles(DEMO / "bottle")
    # the recorded hashes are those of the arrays fitted (at the run's size), as the guard saw them
    evaluation = {pixel_hash(load_image(s.path, 64)) for s in roles.evaluation}
    reference = {pixel_hash(load_image(s.path, 64)) for s in roles.reference}
    seg = set(r["training_hashes"]["segmenter"])
    bank = set(r["training_hashes"]["patchcore_positive_bank"])
    assert evaluation and not (seg & evaluation) and not (bank & evaluation)
    assert reference <= seg and reference <= bank       # the reference arm did learn from them
    assert len(seg) > len(reference) + 30               # + train/good + the synthetic defects


def test_two_runs_give_identical_numbers(runs):
    a, b, _ = runs
    for key in ("patchcore", "segmenter", "backends", "verdict", "training_hashes", "real_only", "delta"):
        assert a[key] == b[key], key


def test_masks_come_from_the_reference_shapes_on_the_product():
    from pipelines.shapes import estimate_foreground
    bottle = [load_image(p, 128) for p in load_category(DEMO / "bottle").train]
    fg = estimate_foreground(bottle)
    assert 0.2 < fg.mean() < 0.9 and fg[64, 64] and not fg[0, 0]        # the bottle, not the corners
    roles = folder_roles(DEMO / "bottle")
    refs = [load_mask(s, 128) for s in roles.reference if s.label == "contamination"]
    sampler = MaskSampler.fit("contamination", refs, fg)
    rng = np.random.default_rng(0)
    masks = [sampler.sample((128, 128), rng) for _ in range(10)]
    assert all(m.shape == (128, 128) and m.any() for m in masks)
    if sampler.foreground is not None:
        assert all(not (m & ~sampler.foreground).any() for m in masks)
    again = MaskSampler.fit("contamination", refs, fg).sample((128, 128), np.random.default_rng(0))
    assert np.array_equal(again, masks[0])                                  # seeded


def test_generators_all_and_unknown(tmp_path):
    roles = folder_roles(DEMO / "bottle")
    notes: list[str] = []
    names = [p.name for p in resolve_generators(["all"], None, roles, notes)]
    assert {"perlin", "cutpaste"} <= set(names)
    assert all(n in names or any(note.startswith(f"skipped {n}") for note in notes)
               for n in ("pixel-inpaint",))          # included when a trained model is found, else a note
    with pytest.raises(KeyError, match="known"):
        resolve_generators(["nope"], None, roles, [])
    with pytest.raises(ValueError, match="nothing to compare"):
        run_experiment(ExperimentRequest(data=str(DEMO / "bottle"), out=str(tmp_path / "x")))


def _leaky_export(tmp_path: Path) -> tuple[Path, str]:
    """An export whose one synthetic sample names an evaluation image as its ancestor, plus a
    pixel-identical copy of an evaluation image."""
    roles = folder_roles(DEMO / "bottle")
    ev = roles.evaluation[0]
    exp = tmp_path / "export"
    (exp / "synthetic" / ev.label).mkdir(parents=True)
    (exp / "synthetic_ground_truth" / ev.label).mkdir(parents=True)
    ref = roles.reference[0]
    shutil.copy(ref.path, exp / "synthetic" / ev.label / "000.png")
    shutil.copy(ref.mask_path, exp / "synthetic_ground_truth" / ev.label / "000_mask.png")
    (exp / "provenance.jsonl").write_text(json.dumps(
        {"file": f"synthetic/{ev.label}/000.png", "descends_from": [file_pixel_hash(ev.path)]}) + "\n")
    return exp, ev


def test_leaking_synthetic_export_is_refused_by_the_cli(tmp_path):
    exp, ev = _leaky_export(tmp_path)
    cmd = [sys.executable, "-m", "studio", "experiment", "--data", str(DEMO / "bottle"), "--synthetic", str(exp),
           "--quiet", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in FAST.items()
                            if k not in ("per_type", "n_boot")), []), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"synthetic/{ev.label}/000.png" in lines[0] and "evaluat" in lines[0]
    assert not (tmp_path / "out" / "metrics.json").exists()

    # a synthetic image whose pixels are an evaluation image is refused too (no provenance needed)
    (exp / "provenance.jsonl").unlink()
    shutil.copy(ev.path, exp / "synthetic" / ev.label / "001.png")
    shutil.copy(ev.mask_path, exp / "synthetic_ground_truth" / ev.label / "001_mask.png")
    with pytest.raises(ValueError, match=f"synthetic/{ev.label}/001.png equals the evaluation image "
                                         f"test/{ev.label}/{ev.path.name}"):
        run_experiment(ExperimentRequest(data=str(DEMO / "bottle"), out=str(tmp_path / "o2"),
                                         synthetic=str(exp), **FAST))
