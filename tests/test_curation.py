"""Curation: plan errors, resume without duplicates, review queue, COCO round trip, and the
experiment's reproducibility and refusal without synthetic samples."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studio.formats.coco import export_coco, rle_decode, rle_encode
from studio.curation import CurationDB, CurationError, make_plan, next_candidate, plan_status, run_plan
from studio.dataset import Store

ROOT = Path(__file__).resolve().parent.parent


def test_plan_errors(curation_ws, tmp_path):
    store, cdb = curation_ws
    with pytest.raises(CurationError, match="below the current count of"):
        make_plan(store, cdb, "brushed_metal", target=2)
    empty = Store(tmp_path / "empty")
    m = np.zeros((32, 32), np.uint8)
    m[5:10, 5:10] = 255
    empty.add_image("widget", np.full((32, 32, 3), 90, np.uint8), split="test", label="dent", mask=m)
    with pytest.raises(CurationError, match="no source images"):
        make_plan(empty, CurationDB(tmp_path / "empty"), "widget", target=3)
    with pytest.raises(CurationError, match="unknown classes"):
        make_plan(store, cdb, "brushed_metal", target=8, labels=["melted"])


def test_plan_prioritises_deficit_and_resume_creates_no_duplicates(curation_ws):
    store, cdb = curation_ws
    # one class ahead: accept a synthetic scratch so 'scratch' has the smallest deficit
    img = store.load_image(store.list_images(product="brushed_metal", split="train")[0]["id"])
    m = np.zeros(img.shape[:2], np.uint8)
    m[40:50, 30:120] = 255
    sid = store.add_sample(product="brushed_metal", image=img, mask=m, damage_type="scratch",
                           generator="perlin", generator_version="1", params={}, seed=0)
    store.accept(sid)
    plan = make_plan(store, cdb, "brushed_metal", target=8, backends=("perlin",))
    planned = {r["label"]: r["planned"] for r in plan["summary"]}
    assert planned == {"crack": 3, "stain": 3, "scratch": 2}
    assert plan["summary"][-1]["label"] == "scratch"  # smallest deficit last
    calls = {"n": 0}

    def cancel_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    first = run_plan(store, cdb, plan["plan_id"], cancelled=cancel_after_three, use_detector=False)
    assert first["done"] == 3 and first["pending"] == 5
    # simulate a crash after a sample was written but before its item was marked done
    item = cdb.q("SELECT * FROM plan_items WHERE plan_id=? AND status='pending' ORDER BY idx LIMIT 1",
                 (plan["plan_id"],))[0]
    store.add_sample(product="brushed_metal", image=img, mask=m, damage_type=item["label"],
                     generator="perlin", generator_version="1", params={}, seed=item["seed"],
                     batch_id=f"plan{plan['plan_id']}:{item['idx']}")
    second = run_plan(store, cdb, plan["plan_id"], use_detector=False)
    # the crashed item's sample is reused, not duplicated; it is another image than the item's
    # source, so verification rejects it (changed outside the mask) and one retry replaces it
    assert second["resumed_existing"] == 1 and second["created"] == 5
    st = plan_status(cdb, plan["plan_id"])
    assert st["done"] == 8 and st["pending"] == 0
    batch = store.samples_in_batch(f"plan{plan['plan_id']}:")
    assert len(batch) == 9 and len({s["batch_id"] for s in batch}) == 9  # no duplicates
    assert sum(s["batch_id"].endswith("~r1") for s in batch) == 1
    assert all(s["status"] in ("candidate", "rejected") for s in batch)  # nothing auto-accepted

    first_item = next_candidate(store, cdb, "brushed_metal")
    assert first_item["prescreen"]["outside_change"] == 0
    assert first_item["remaining"] == len(batch) - sum(s["status"] == "rejected" for s in batch)
    nxt = next_candidate(store, cdb, "brushed_metal", after=first_item["sample"]["id"])  # skip
    assert nxt["sample"]["id"] > first_item["sample"]["id"]


def test_coco_rle_round_trip_and_export(curation_ws, tmp_path):
    store, _ = curation_ws
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((13, 17)) > 0.7
        assert np.array_equal(rle_decode(rle_encode(m)), m)
    rep = export_coco(store, "brushed_metal", tmp_path / "coco")
    doc = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert rep["annotations"] == 15 and {c["name"] for c in doc["categories"]} == {"scratch", "crack", "stain"}
    ann = doc["annotations"][0]
    img = next(i for i in doc["images"] if i["id"] == ann["image_id"])
    row = next(r for r in store.list_images(product="brushed_metal") if f"real_{r['id']:06d}.png" in img["file_name"])
    assert np.array_equal(rle_decode(ann["segmentation"]), store.load_mask(row["id"]) > 0)


def _experiment(args, out):
    return subprocess.run([sys.executable, "-m", "studio", "experiment", *map(str, args), "--out", str(out),
                           "--quiet", "--size", "128", "--coreset", "0.05", "--repeats", "2",
                           "--segmenter-steps", "30", "--bootstrap", "200"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_experiment_is_reproducible_and_needs_synthetics(curation_ws, tmp_path):
    store, cdb = curation_ws
    data = ROOT / "assets" / "demo" / "brushed_metal"
    r = _experiment(["--data", data, "--synthetic", data], tmp_path / "none")
    assert r.returncode != 0 and "no accepted synthetic samples" in r.stderr
    plan = make_plan(store, cdb, "brushed_metal", target=7, backends=("perlin",))
    run_plan(store, cdb, plan["plan_id"], use_detector=False)
    for s in store.samples_in_batch(f"plan{plan['plan_id']}:"):
        store.accept(s["id"])
    store.export_mvtec(tmp_path / "exp", "brushed_metal")
    syn = tmp_path / "exp" / "brushed_metal"
    runs = []
    for k in range(2):
        r = _experiment(["--data", data, "--synthetic", syn], tmp_path / f"e{k}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads((tmp_path / f"e{k}" / "metrics.json").read_text()))
    for block in ("patchcore", "segmenter", "verdict", "real_only", "with_synthetic", "delta"):
        assert runs[0][block] == runs[1][block], block          # identical numbers
    assert runs[0]["source"] == "synthetic" and runs[0]["synthetic"]["samples"] == runs[0]["n_synthetic"] > 0
    assert runs[0]["patchcore"]["delta"]["pixel_ap"]["verdict"] in ("helped", "no detectable effect", "hurt")
    report = (tmp_path / "e0" / "report.md").read_text()
    assert "Did synthetic data help?" in report and "| segmenter | reference_plus_synthetic |" in report
