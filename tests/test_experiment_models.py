"""The experiment picks a per-product generator's model by itself (pixel-inpaint): the product is
the data folder's name, the workspace's trained runs (``<workspace>/adapters``) come before the
shipped model, the choice is made per damage type (a model never runs for a type it was not
trained for), every picked model's training data is checked against the evaluation images, and
metrics.json / report.md record which model folder made which type. Demo data, tiny settings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.mvtec import load_image
from pipelines.roles import LeakageError, file_pixel_hash, folder_roles, pixel_hash
from studio.experiment import ExperimentRequest, load_protocol, resolve_generators, run_experiment, synthesize

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
SHIPPED = ROOT / "assets" / "models" / "bottle" / "pixel-inpaint"
TYPES = ["broken_large", "broken_small", "contamination"]
MARK = "f" * 64                      # a pixel hash no real image has: marks the workspace model's samples
ENV = "DEFECT_STUDIO_PIXEL_INPAINT"


@pytest.fixture(autouse=True)
def _no_env_model(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def _workspace_run(ws: Path, product: str, types: list[str], ancestors: list[str]) -> Path:
    """A Training-tab run in ``ws/adapters`` for ``product`` (trained on a folder of that name),
    knowing ``types``: the shipped weights in a checkpoint, as tests/test_shipped_models.py does."""
    run = ws / "adapters" / f"pixel-inpaint-{product}"
    ck = run / "checkpoints" / "step-0000010"
    ck.mkdir(parents=True)
    shutil.copy(SHIPPED / "model.safetensors", ck / "model.safetensors")
    meta = json.loads((SHIPPED / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "damage_types": types}))
    (ck / "trainer_state.json").write_text(json.dumps({"kind": "pixel-inpaint", "step": 10}))
    (run / "latest").write_text(ck.name)
    (run / "training_data.json").write_text(json.dumps(
        {"data": str(ws / "exports" / f"{product}-1" / product), "ancestors": ancestors}))
    return run


def _shipped_ancestors() -> list[str]:
    return json.loads((SHIPPED / "training_data.json").read_text())["ancestors"]


def test_cli_all_runs_pixel_inpaint_with_the_shipped_model_and_records_it(tmp_path):
    """`--generate all` without --model on the demo bottle: pixel-inpaint is one of the compared
    generators, with the shipped bottle model for every type, recorded in metrics.json and report.md."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DEFECT_STUDIO_WORKSPACE=str(tmp_path / "env-ws"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "studio", "experiment", "--data", str(DEMO / "bottle"),
                           "--generate", "all", "--per-type", "1", "--repeats", "1", "--backbone", "random",
                           "--size", "64", "--coreset", "0.05", "--segmenter-steps", "10", "--bootstrap", "100",
                           "--quiet", "--out", str(out), "--workspace", str(tmp_path / "fresh-ws")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "metrics.json").read_text())
    assert {"perlin", "cutpaste", "pixel-inpaint"} <= set(r["backends"])
    g = r["generators"]["pixel-inpaint"]
    assert g["models"] == {t: str(SHIPPED) for t in TYPES}
    assert g["model_sources"] == {str(SHIPPED): "shipped"} and g["skipped_types"] == {}
    assert g["model_training_images"] == {str(SHIPPED): len(_shipped_ancestors())}
    assert r["generators"]["perlin"]["models"] is None
    assert r["backends"]["pixel-inpaint"]["n_synthetic"] == len(TYPES)          # 1 per type, 1 repeat
    assert r["protocol"]["product"] == "bottle"
    assert r["protocol"]["model_roots"] == [str(tmp_path / "fresh-ws" / "adapters")]
    # the shipped model learned from the product's reference defects, so the run keeps the product's
    # roles (one fold) — cross-fitting would score what it learned from — and says so
    assert r["protocol"]["folds"]["k"] == 1
    assert any(n.startswith("one fold (the product's roles) instead of 3") for n in r["notes"])
    # what the arrays fitted were (hashes at the run's size, as the guard returned them): the
    # reference defects, never an evaluation image
    roles = folder_roles(DEMO / "bottle")
    at64 = lambda ss: {pixel_hash(load_image(s.path, 64)) for s in ss}
    assert at64(roles.reference) <= set(r["training_hashes"]["segmenter"])
    assert not set(r["training_hashes"]["segmenter"]) & at64(roles.evaluation)
    assert not any(n.startswith("skipped pixel-inpaint") for n in r["notes"])
    report = (out / "report.md").read_text()
    assert (f"pixel-inpaint models: {', '.join(TYPES)} → `{SHIPPED}` (shipped; its training data: "
            f"{len(_shipped_ancestors())} real images, 0 of them scored here)") in report
    assert "## pixel-inpaint" in report and (out / "samples" / "pixel-inpaint.png").is_file()


def test_a_product_without_a_model_skips_pixel_inpaint_saying_how_to_train_one(tmp_path):
    widget = tmp_path / "widget"
    shutil.copytree(DEMO / "bottle", widget)
    req = ExperimentRequest(data=str(widget), out=str(tmp_path / "o"), generate="all",
                            workspace=str(tmp_path / "ws"))
    assert req.product == "widget"
    roles = folder_roles(widget)
    notes: list[str] = []
    plans = resolve_generators(["all"], None, roles, notes, req.product, req.model_roots())
    assert {"perlin", "cutpaste"} <= {p.name for p in plans} and "pixel-inpaint" not in {p.name for p in plans}
    note = next(n for n in notes if n.startswith("skipped pixel-inpaint"))
    assert "'widget'" in note and "python -m studio train --kind pixel-inpaint" in note
    assert str(tmp_path / "ws" / "adapters") in note and "--model" in note
    # named explicitly, it cannot run at all: an error with the same instruction
    with pytest.raises(ValueError, match="python -m studio train --kind pixel-inpaint"):
        resolve_generators(["pixel-inpaint"], None, roles, [], req.product, req.model_roots())
    # the same folder's demo name has the shipped model: the product is the folder's name
    assert "pixel-inpaint" in [p.name for p in resolve_generators(["all"], None, folder_roles(DEMO / "bottle"),
                                                                  [], "bottle", req.model_roots())]


def test_a_workspace_model_comes_first_and_only_for_the_types_it_learned(tmp_path):
    ws = tmp_path / "ws"
    run = _workspace_run(ws, "bottle", ["contamination"], [MARK, *_shipped_ancestors()[:2]])
    req = ExperimentRequest(data=str(DEMO / "bottle"), out=str(tmp_path / "o"), generate="pixel-inpaint",
                            per_type=1, size=64, workspace=str(ws))
    notes: list[str] = []
    [plan] = resolve_generators(["pixel-inpaint"], None, folder_roles(DEMO / "bottle"), notes,
                                req.product, req.model_roots())
    assert plan.models == {"contamination": str(run), "broken_large": str(SHIPPED), "broken_small": str(SHIPPED)}
    assert plan.provenance()["model_sources"] == {str(run): "workspace run", str(SHIPPED): "shipped"}
    assert any(f"contamination with the model {run} (workspace run)" in n for n in notes)
    # the samples of each type carry their own model's training data as ancestors
    d = load_protocol(req, lambda *a: None)
    assert len(d.folds) == 1       # the model learned from real defects: the product's roles, one fold
    syn = synthesize(d.plans[0], d.train, d.train_hashes, d.reference(d.folds[0]), d.mask_models[0], 1, 0, 0, 0.8, 4)
    assert sorted(s.label for s in syn) == TYPES
    assert all((MARK in s.ancestors) == (s.label == "contamination") for s in syn)


def test_a_type_no_model_learned_is_skipped_not_run_with_another_types_model(tmp_path):
    widget, ws = tmp_path / "widget", tmp_path / "ws"
    shutil.copytree(DEMO / "bottle", widget)
    run = _workspace_run(ws, "widget", ["contamination"], _shipped_ancestors())
    req = ExperimentRequest(data=str(widget), out=str(tmp_path / "o"), generate="all", per_type=1, size=64,
                            workspace=str(ws))
    notes: list[str] = []
    plans = {p.name: p for p in resolve_generators(["all"], None, folder_roles(widget), notes,
                                                   req.product, req.model_roots())}
    plan = plans["pixel-inpaint"]
    assert plan.models == {"contamination": str(run)}
    assert set(plan.skipped_types) == {"broken_large", "broken_small"}
    assert all("--damage-types" in why and "'widget'" in why for why in plan.skipped_types.values())
    assert any(n.startswith("pixel-inpaint: contamination with the model") and "type broken_large skipped" in n
               for n in notes)
    d = load_protocol(req, lambda *a: None)
    syn = synthesize(d.plans[[p.name for p in d.plans].index("pixel-inpaint")], d.train, d.train_hashes,
                     d.reference(d.folds[0]), d.mask_models[0], 1, 0, 0, 0.8, 4)
    assert [s.label for s in syn] == ["contamination"]


def test_a_model_given_runs_only_for_the_types_it_was_trained_for(tmp_path):
    """--model names one folder for every type: the types it does not know are skipped with a note
    (never run with a model that lacks them, which would fail mid-run); a model knowing none of
    them, named explicitly, is an error that says how to train one."""
    run = _workspace_run(tmp_path / "ws", "bottle", ["contamination"], _shipped_ancestors())
    roles = folder_roles(DEMO / "bottle")
    notes: list[str] = []
    plan = {p.name: p for p in resolve_generators(["all"], str(run), roles, notes, "bottle", ())}["pixel-inpaint"]
    assert plan.models == {"contamination": str(run)}
    assert set(plan.skipped_types) == {"broken_large", "broken_small"}
    assert all("not trained for type" in why and "--damage-types" in why for why in plan.skipped_types.values())
    assert plan.model_sources == {str(run): "--model"}
    # a model for another product's types only: nothing to generate, an error when named explicitly
    other = _workspace_run(tmp_path / "ws2", "bottle", ["scratch"], _shipped_ancestors())
    with pytest.raises(ValueError, match="not trained for type"):
        resolve_generators(["pixel-inpaint"], str(other), roles, [], "bottle", ())


def test_a_picked_model_that_learned_from_an_evaluation_image_is_refused(tmp_path):
    roles = folder_roles(DEMO / "bottle")
    ev = roles.evaluation[0]
    ws = tmp_path / "ws"
    run = _workspace_run(ws, "bottle", TYPES, [*_shipped_ancestors(), file_pixel_hash(ev.path)])
    req = ExperimentRequest(data=str(DEMO / "bottle"), out=str(tmp_path / "o"), generate="all", per_type=1,
                            repeats=1, size=64, backbone="random", workspace=str(ws))
    with pytest.raises(LeakageError, match="evaluat") as exc:
        resolve_generators(["all"], None, roles, [], req.product, req.model_roots())
    assert str(run) in str(exc.value)
    with pytest.raises(LeakageError):
        run_experiment(req)
    assert not (tmp_path / "o" / "metrics.json").exists()
    # the same model named with --model: refused too; a clean one is used for every type, as given
    with pytest.raises(LeakageError, match="evaluat"):
        resolve_generators(["pixel-inpaint"], str(run), roles, [], "bottle", ())
    [plan] = resolve_generators(["pixel-inpaint"], str(SHIPPED), roles, [], "bottle", req.model_roots())
    assert plan.models == {t: str(SHIPPED) for t in TYPES}
    assert plan.provenance()["model_sources"] == {str(SHIPPED): "--model"}
    # a picked model that does not say what it learned from is not used either (nor replaced)
    (run / "training_data.json").write_text(json.dumps({"data": str(ws / "exports" / "bottle-1" / "bottle")}))
    notes: list[str] = []
    names = [p.name for p in resolve_generators(["all"], None, roles, notes, req.product, req.model_roots())]
    assert "pixel-inpaint" not in names
    assert any(n.startswith("skipped pixel-inpaint") and "training_data.json" in n for n in notes)
