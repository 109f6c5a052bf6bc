"""The pixel-inpaint models shipped with the demo products (``assets/models``, made by
``scripts/train_demo_models.py``): present and small, trained on reference defects only, found
without ``--model`` (workspace run first, then the shipped one), unavailable with a clear message
when missing or corrupt, and every backend list read from the registry."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import masks as mk
from pipelines import pixel_inpaint as P
from pipelines import pixel_inpaint_files as PF
from pipelines import registry
from pipelines.roles import category_roles, check_descent, pixel_hash
from pipelines.mvtec import load_category, load_image

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
MODELS = ROOT / "assets" / "models"
PRODUCTS = sorted(p.name for p in DEMO.iterdir() if (p / "train" / "good").is_dir())


@pytest.fixture(autouse=True)
def _no_env_model(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)


def _shipped_copy(tmp_path, monkeypatch) -> Path:
    """A copy of assets/models that the test may break, used as the shipped folder."""
    root = tmp_path / "models"
    shutil.copytree(MODELS, root)
    monkeypatch.setattr(PF, "SHIPPED_DIR", root)     # where shipped models are looked up
    return root


# ------------------------------------------------------------------------------------- the files
@pytest.mark.parametrize("product", PRODUCTS)
def test_shipped_model_files_exist_are_small_and_learned_from_reference_defects_only(product):
    folder = MODELS / product / "pixel-inpaint"
    for name in ("model.safetensors", "config.json", "training_data.json"):
        assert (folder / name).is_file(), f"{folder / name} missing: run scripts/train_demo_models.py"
    assert (folder / "model.safetensors").stat().st_size <= 5_000_000
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5_500_000
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == P.FORMAT and meta["weights_dtype"] == "float16"
    roles = category_roles(load_category(DEMO / product))
    assert meta["damage_types"] == sorted({s.label for s in roles.reference})
    manifest = json.loads((folder / "training_data.json").read_text())
    assert manifest["data"] == f"assets/demo/{product}"
    # the ancestors are exactly the reference defects' pixel hashes (as the store keeps them) ...
    reference = {pixel_hash(load_image(s.path, None)) for s in roles.reference}
    assert set(manifest["ancestors"]) == reference
    assert set(manifest["reference_hashes"].values()) == reference
    # ... and none is an evaluation image: the experiment's leakage check accepts its samples
    assert not reference & roles.evaluation_hashes
    check_descent([("shipped model", manifest["ancestors"])], roles.evaluation_hashes)


@pytest.mark.parametrize("product", PRODUCTS)
def test_shipped_model_loads_and_keeps_pixels_outside_the_mask(product):
    model = P.PixelInpaintModel.load(MODELS / product / "pixel-inpaint")
    img = load_image(sorted((DEMO / product / "train" / "good").glob("*.png"))[0], None)
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[100:130, 90:140] = 255
    out = model.inpaint(img, mask, model.types[0], seed=0, steps=2, feather=3)
    outside = mk.dilate(mask, 3) == 0
    assert np.array_equal(out[outside], img[outside]) and not np.array_equal(out, img)


# ----------------------------------------------------------------------------------- the registry
def test_registry_offers_pixel_inpaint_with_the_shipped_models():
    for product in PRODUCTS:
        ok, msg = registry.backend_status("pixel-inpaint", product)
        assert ok and str(MODELS / product / "pixel-inpaint") in msg
        assert registry.default_model("pixel-inpaint", product) == str(MODELS / product / "pixel-inpaint")
        assert "pixel-inpaint" in registry.offline_names("damage", product)
    ok, msg = registry.backend_status("pixel-inpaint")          # a backend list: any product
    assert ok and all(p in msg for p in PRODUCTS)
    assert "pixel-inpaint" in registry.offline_names("damage")
    # a product without a model: unavailable, saying where to put one
    ok, msg = registry.backend_status("pixel-inpaint", "my_widget")
    assert not ok and str(MODELS / "my_widget" / "pixel-inpaint") in msg and "python -m studio train" in msg
    # a direct call that names no model still needs one (the experiment is not given a product)
    assert not P.PixelInpaintGenerator.available()[0]


def test_registry_reports_a_missing_or_corrupt_model_folder(tmp_path, monkeypatch):
    root = _shipped_copy(tmp_path, monkeypatch)
    folder = root / "bottle" / "pixel-inpaint"
    assert registry.backend_status("pixel-inpaint", "bottle")[0]

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])        # truncated
    ok, msg = registry.backend_status("pixel-inpaint", "bottle")
    assert not ok and f"put one in {folder}" in msg and "corrupt or truncated" in msg
    assert registry.default_model("pixel-inpaint", "bottle") is None

    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{not json")
    ok, msg = registry.backend_status("pixel-inpaint", "bottle")
    assert not ok and "not valid JSON" in msg and f"put one in {folder}" in msg

    shutil.rmtree(folder)
    ok, msg = registry.backend_status("pixel-inpaint", "bottle")
    assert not ok and "shipped model: missing" in msg and f"put one in {folder}" in msg
    assert "model.safetensors + config.json + training_data.json" in msg

    shutil.rmtree(root)
    ok, msg = registry.backend_status("pixel-inpaint")                  # nothing shipped at all
    assert not ok and "scripts/train_demo_models.py" in msg
    assert "pixel-inpaint" not in registry.offline_names("damage")


def test_the_workspace_model_comes_first_then_the_shipped_one(tmp_path):
    from studio import services
    shipped = MODELS / "bottle" / "pixel-inpaint"
    ws = tmp_path / "ws"
    assert services.default_model("pixel-inpaint", "bottle", ws) == str(shipped)
    # a run of the Training tab for bottle, trained for one type only
    run = ws / "adapters" / "pixel-inpaint-bottle"
    ck = run / "checkpoints" / "step-0000010"
    ck.mkdir(parents=True)
    shutil.copy(shipped / "model.safetensors", ck / "model.safetensors")
    meta = json.loads((shipped / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "damage_types": ["contamination"]}))
    (ck / "trainer_state.json").write_text(json.dumps({"kind": "pixel-inpaint", "step": 10}))
    (run / "latest").write_text(ck.name)
    (run / "training_data.json").write_text(json.dumps({"data": str(ws / "exports" / "bottle-1" / "bottle"),
                                                         "ancestors": ["abc"]}))
    assert services.default_model("pixel-inpaint", "bottle", ws) == str(run)
    assert services.default_model("pixel-inpaint", "bottle", ws, "contamination") == str(run)
    # a type the workspace model does not know: the shipped one that does
    assert services.default_model("pixel-inpaint", "bottle", ws, "broken_large") == str(shipped)
    # another product's run is never picked
    assert services.default_model("pixel-inpaint", "brushed_metal", ws) == str(MODELS / "brushed_metal" / "pixel-inpaint")


def test_service_generates_with_the_shipped_model_and_records_its_ancestors(tmp_path):
    from studio.dataset import Store
    from studio.services import GenerateRequest, UserError, generate
    store = Store(tmp_path / "ws")
    store.import_mvtec(DEMO / "bottle")
    src = store.list_images(product="bottle", label="good", split="train")[0]
    img = store.load_image(src["id"])
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[60:90, 100:150] = 255
    req = GenerateRequest(image=img, mask=mask, damage_type="contamination", product="bottle",
                          backend="pixel-inpaint", n=1, options={"steps": 2}, source_image_id=src["id"])
    cand = generate(req, store=store)[0]
    manifest = json.loads((MODELS / "bottle" / "pixel-inpaint" / "training_data.json").read_text())
    assert cand.params["model"] == str(MODELS / "bottle" / "pixel-inpaint")
    assert set(cand.ancestors) == set(manifest["ancestors"])
    reference = {r["sha256"] for r in store.reference_defects("bottle")}
    evaluation = store.evaluation_hashes("bottle")
    assert evaluation and not set(cand.ancestors) & evaluation
    assert set(cand.ancestors) == reference          # the store's roles = the folder's roles
    # no product: pixel-inpaint cannot pick a model, and says so
    with pytest.raises(UserError, match="picks its model by product"):
        generate(GenerateRequest(image=img, mask=mask, damage_type="contamination", backend="pixel-inpaint",
                                 n=1, options={"steps": 2}))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_generate_pixel_inpaint_without_model_on_a_fresh_workspace(tmp_path):
    img = load_image(sorted((DEMO / "bottle" / "train" / "good").glob("*.png"))[3], None)
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[120:150, 80:140] = 255
    Image.fromarray(img).save(tmp_path / "good.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    env = {k: v for k, v in os.environ.items() if k != P.ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "studio", "generate", "--backend", "pixel-inpaint",
                           "--product", "bottle", "--damage", "contamination", "--image", str(tmp_path / "good.png"),
                           "--mask", str(tmp_path / "mask.png"), "--n", "1", "--steps", "3", "--feather", "4",
                           "--quiet", "--workspace", str(tmp_path / "fresh-ws"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cand = np.asarray(Image.open(out / "candidate_00.png").convert("RGB"))
    outside = mk.dilate(mask, 4) == 0
    assert np.array_equal(cand[outside], img[outside]) and not np.array_equal(cand, img)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["candidates"][0]["generator"] == "pixel-inpaint"
    assert prov["candidates"][0]["params"]["model"] == str(MODELS / "bottle" / "pixel-inpaint")
    # an unknown product: a one-line error naming where a model goes
    proc = subprocess.run([sys.executable, "-m", "studio", "generate", "--backend", "pixel-inpaint",
                           "--product", "widget", "--damage", "scratch", "--image", str(tmp_path / "good.png"),
                           "--mask", str(tmp_path / "mask.png"), "--n", "1", "--quiet",
                           "--workspace", str(tmp_path / "fresh-ws"), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "assets/models/widget/pixel-inpaint" in proc.stderr or "widget" in proc.stderr


# -------------------------------------------------------------------- lists come from the registry
def test_backend_lists_come_from_the_registry():
    from studio.ui.annotate import backend_help
    from studio.ui.curation_tab import experiment_choices
    assert backend_help("pixel-inpaint").splitlines()[-1].startswith("✅")
    assert backend_help("auto") == registry.auto_description("damage")
    assert registry.auto_description("damage") == "auto: cutpaste when reference defects of the type exist, else perlin"
    assert set(registry.plan_defaults()) == {"perlin", "cutpaste"}
    assert set(experiment_choices()) <= set(registry.generator_names("damage"))
    # no module keeps its own list of backend names
    for path in [ROOT / "studio" / "__main__.py", *sorted((ROOT / "studio" / "cli").glob("*.py")),
                 *sorted((ROOT / "studio" / "ui").glob("*.py"))]:
        text = path.read_text()
        assert not re.search(r"""["']perlin["']\s*,\s*["']cutpaste["']|["']cutpaste["']\s*,\s*["']perlin["']""", text), path


# ------------------------------------------------------------------------------------ the script
def test_train_script_is_reproducible_and_writes_the_shipped_layout(tmp_path, monkeypatch):
    """The script's own code path at a toy size (tiny U-Net, 32 px, 2 steps): two runs, same bytes."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("train_demo_models", ROOT / "scripts" / "train_demo_models.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    real = script.config_for

    def tiny(data, out, steps, seed=0):
        cfg = real(data, out, steps, seed)
        cfg.preset, cfg.resolution, cfg.min_crop, cfg.batch_size, cfg.image_size = "tiny", 32, 32, 2, 128
        return cfg
    monkeypatch.setattr(script, "config_for", tiny)
    torch.set_num_threads(1)
    files = ("model.safetensors", "config.json", "training_data.json")
    runs = []
    for i in range(2):
        log = script.train_product("brushed_metal", DEMO, tmp_path / f"out{i}", 2, 1, quiet=True, with_preview=False)
        folder = tmp_path / f"out{i}" / "brushed_metal" / "pixel-inpaint"
        runs.append({f: (folder / f).read_bytes() for f in files})
        assert log["steps"] == 2 and (folder / "training_log.json").is_file()
    assert runs[0] == runs[1]
    assert P.available(str(folder))[0]
    manifest = json.loads(runs[0]["training_data.json"])
    roles = category_roles(load_category(DEMO / "brushed_metal"))
    assert set(manifest["ancestors"]) == {pixel_hash(load_image(s.path, None)) for s in roles.reference}


def test_curation_plan_runs_with_the_shipped_model(tmp_path):
    from studio.curation import CurationDB, make_plan, run_plan
    from studio.dataset import Store
    store = Store(tmp_path / "ws")
    store.import_mvtec(DEMO / "bottle")
    cdb = CurationDB(tmp_path / "ws")
    plan = make_plan(store, cdb, "bottle", target=1, mode="fixed", labels=["contamination"],
                     backends=("pixel-inpaint",), retries=0)
    assert plan["items"] == 1
    run_plan(store, cdb, plan["plan_id"], use_detector=False, retries=0)
    rows = store.list_samples(product="bottle")
    assert rows and {r["generator"] for r in rows} == {"pixel-inpaint"}
    assert rows[0]["params"]["model"] == str(MODELS / "bottle" / "pixel-inpaint")


def test_the_ui_the_cli_and_the_experiment_pick_the_same_model_per_product_and_type(tmp_path):
    """One model policy: for every (demo product, damage type) the service (what the Annotate tab
    and `studio generate` call) and the experiment's pick_models give the same model folder — a
    workspace run for the types it was trained for, else the shipped model that knows the type,
    else none (never a model that was not trained for the type)."""
    from studio import services
    from studio.experiment import pick_models
    ws = tmp_path / "ws"
    shipped = MODELS / "bottle" / "pixel-inpaint"
    run = ws / "adapters" / "pixel-inpaint-bottle"
    ck = run / "checkpoints" / "step-0000010"
    ck.mkdir(parents=True)
    shutil.copy(shipped / "model.safetensors", ck / "model.safetensors")
    meta = json.loads((shipped / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "damage_types": ["contamination"]}))
    (ck / "trainer_state.json").write_text(json.dumps({"kind": "pixel-inpaint", "step": 10}))
    (run / "latest").write_text(ck.name)
    (run / "training_data.json").write_text(json.dumps({"data": str(ws / "exports" / "bottle-1" / "bottle"),
                                                         "ancestors": ["abc"]}))   # a run for bottle
    demo = ROOT / "assets" / "demo"
    checked = 0
    for product in sorted(p.name for p in demo.iterdir() if (p / "ground_truth").is_dir()):
        types = sorted(t.name for t in (demo / product / "ground_truth").iterdir() if t.is_dir())
        types.append("a_type_no_model_knows")          # both: none (no fallback to another type's model)
        models, missing = pick_models("pixel-inpaint", product, services.model_roots(ws), types)
        for t in types:
            assert services.default_model("pixel-inpaint", product, ws, t) == models.get(t), (product, t)
            assert (t in models) != (t in missing)
            checked += 1
    assert checked >= 4
    assert services.default_model("pixel-inpaint", "bottle", ws, "contamination") == str(run)
