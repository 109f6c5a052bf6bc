"""Data roles and evaluation hygiene: nothing that learns from or copies real defects sees an image
that is later scored — checked by pixel hash, at every consumer, also through provenance."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines import roles as R
from pipelines.imageio import read_rgb
from studio.dataset import Store

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"


@pytest.fixture(scope="module")
def bottle_roles():
    return R.folder_roles(BOTTLE)


# ------------------------------------------------------------------------------------------------
# the rule
def test_rule_is_per_type_deterministic_and_order_free():
    items = [(t, f"{t}{i:02d}") for t in ("crack", "hole") for i in range(10)] + [("lone", "x")]
    a = R.assign_roles(items, 0.4)
    b = R.assign_roles(list(reversed(items)), 0.4)
    assert a == b                                              # order of the files does not matter
    for t in ("crack", "hole"):
        assert sum(a[f"{t}{i:02d}"] == R.REFERENCE for i in range(10)) == 4
    assert a["x"] == R.EVALUATION                              # a single image is scored, not copied
    assert [R.reference_count(n, 0.4) for n in (1, 2, 4, 5, 10)] == [0, 1, 2, 2, 4]
    with pytest.raises(ValueError, match="fraction"):
        R.assign_roles(items, 1.0)


def test_folder_split_equals_store_split_and_is_stable(tmp_path, bottle_roles):
    assert bottle_roles.reference and bottle_roles.evaluation
    assert not bottle_roles.reference_hashes & bottle_roles.evaluation_hashes
    every = {s.path for s in bottle_roles.reference} | {s.path for s in bottle_roles.evaluation}
    assert every == {s.path for s in bottle_roles._order if s.is_anomaly}     # exactly one role each
    # the same pixels under other file names get the same roles
    copy = tmp_path / "renamed"
    shutil.copytree(BOTTLE, copy)
    for d in (copy / "test").iterdir():
        for f in sorted(d.iterdir(), reverse=True):
            f.rename(f.with_name("z" + f.name))
            gt = copy / "ground_truth" / d.name / f"{f.stem}_mask.png"
            if gt.is_file():
                gt.rename(gt.with_name(f"z{f.stem}_mask.png"))
    assert R.folder_roles(copy).evaluation_hashes == bottle_roles.evaluation_hashes
    for ws in ("a", "b"):                                      # import twice, into two stores
        store = Store(tmp_path / ws)
        store.import_mvtec(BOTTLE)
        assert store.evaluation_hashes("bottle") == bottle_roles.evaluation_hashes
        assert {r["sha256"] for r in store.reference_defects("bottle")} == bottle_roles.reference_hashes
        assert all(r["role"] is None for r in store.list_images(label="good"))
        store.close()


def test_edited_role_travels_through_export(tmp_path, bottle_roles):
    store = Store(tmp_path / "ws")
    store.import_mvtec(BOTTLE)
    ref = store.reference_defects("bottle", "broken_small")[0]
    assert store.set_role(ref["id"], "evaluation")["role"] == "evaluation"
    with pytest.raises(ValueError, match="only real defect images have a role"):
        store.set_role(store.list_images(label="good")[0]["id"], "reference")
    with pytest.raises(ValueError, match="unknown role"):
        store.set_role(ref["id"], "training")
    root = Path(store.export_mvtec(tmp_path / "export", "bottle")["path"])
    folder = R.folder_roles(root)
    assert folder.source == R.EVALUATION_FILE
    assert folder.evaluation_hashes == store.evaluation_hashes("bottle") == \
        bottle_roles.evaluation_hashes | {ref["sha256"]}
    store.close()


# ------------------------------------------------------------------------------------------------
# every consumer
def test_cut_paste_donors_are_reference_only(tmp_path, bottle_roles, monkeypatch):
    from pipelines import classical
    from studio.services import GenerateRequest, generate
    seen: list[str] = []
    original = classical.CutPasteGenerator._generate

    def spy(self, crop, cmask, rng, feather, *, donors, **kw):
        seen.extend(R.pixel_hash(np.asarray(d[0])) for d in donors)
        return original(self, crop, cmask, rng, feather, donors=donors, **kw)

    monkeypatch.setattr(classical.CutPasteGenerator, "_generate", spy)
    store = Store(tmp_path / "ws")
    store.import_mvtec(BOTTLE)
    good = store.list_images(label="good", split="train")[0]
    img = store.load_image(good["id"])
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[40:70, 40:80] = 255
    for damage in ("broken_large", "broken_small", "contamination"):
        cands = generate(GenerateRequest(image=img, mask=mask, damage_type=damage, product="bottle",
                                         backend="cutpaste", n=3, source_image_id=good["id"]), store=store)
        for c in cands:
            anc = set(store.get_sample(c.sample_id)["ancestors"])
            assert anc and not anc & bottle_roles.evaluation_hashes
    assert seen and set(seen) <= bottle_roles.reference_hashes
    assert not set(seen) & bottle_roles.evaluation_hashes
    store.close()


def test_trainers_see_reference_defects_only(tmp_path, bottle_roles, monkeypatch):
    from pipelines import lora as L
    from pipelines import pixel_inpaint as P
    from pipelines import pixel_inpaint_model
    from pipelines.training_data import read_manifest
    captured = {}
    monkeypatch.setattr(pixel_inpaint_model, "train_pixel_inpaint", lambda cfg, samples, good, *a: captured.setdefault("pix", samples))
    monkeypatch.setattr(L, "train_lora", lambda cfg, samples, *a: captured.setdefault("lora", samples))
    P.run_from_config(P.PixelInpaintConfig(output_dir=str(tmp_path / "pix"), data=str(BOTTLE)))
    L.run_from_config(L.LoraTrainConfig(output_dir=str(tmp_path / "lora"), data=str(BOTTLE), model="unused"))
    for kind in ("pix", "lora"):
        hashes = {R.pixel_hash(s.image) for s in captured[kind]}
        assert hashes == bottle_roles.reference_hashes            # all reference, no evaluation image
        manifest = read_manifest(tmp_path / kind / "checkpoint-000010")   # found from a checkpoint too
        assert set(manifest["ancestors"]) == bottle_roles.reference_hashes
        assert manifest["excluded_evaluation"] == len(bottle_roles.evaluation)


def test_positive_bank_is_reference_only_and_scored_set_is_disjoint(tmp_path, bottle_roles):
    from studio.evaluation import PatchCoreRequest, run_patchcore
    res = run_patchcore(PatchCoreRequest(data=str(BOTTLE), out=str(tmp_path / "pc"), bank="dual-real",
                                         backbone="random", size=64, max_overlays=0))
    bank = {R.file_pixel_hash(BOTTLE / p) for p in res["held_out_for_positive_bank"]}
    scored = {R.file_pixel_hash(BOTTLE / s["image"]) for s in res["scores"]}
    assert bank == bottle_roles.reference_hashes
    assert not bank & scored
    assert scored >= bottle_roles.evaluation_hashes


# ------------------------------------------------------------------------------------------------
# provenance: a synthetic set that descends from an evaluation image is refused
@pytest.fixture
def leaking_export(tmp_path, bottle_roles):
    """An export whose one accepted sample was painted on an evaluation defect image."""
    from studio.services import GenerateRequest, generate, review
    store = Store(tmp_path / "ws")
    store.import_mvtec(BOTTLE)
    victim = next(r for r in store.list_images(role="evaluation"))
    img = store.load_image(victim["id"])
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[10:30, 10:30] = 255
    cand = generate(GenerateRequest(image=img, mask=mask, damage_type=victim["label"], product="bottle",
                                    backend="perlin", n=1, source_image_id=victim["id"]), store=store)[0]
    review(store, cand.sample_id, "accepted")
    assert victim["sha256"] in store.get_sample(cand.sample_id)["ancestors"]
    root = Path(store.export_mvtec(tmp_path / "export", "bottle")["path"])
    store.close()
    return root


def test_leaking_synthetic_set_is_refused_everywhere(tmp_path, leaking_export):
    from pipelines import pixel_inpaint as P
    from studio.evaluation import PatchCoreRequest, run_patchcore
    # a small change on an evaluation image: the guard (near-duplicate) or the provenance refuses it
    with pytest.raises(R.LeakageError, match="equals the evaluation image|descend from real images that are evaluated"):
        run_patchcore(PatchCoreRequest(data=str(leaking_export), out=str(tmp_path / "pc"),
                                       bank="dual-real-synthetic", positives=str(leaking_export),
                                       backbone="random", size=64))
    with pytest.raises(R.LeakageError, match="synthetic"):
        P.run_from_config(P.PixelInpaintConfig(output_dir=str(tmp_path / "pix"), data=str(leaking_export),
                                               extra_data=str(leaking_export)))
    proc = subprocess.run([sys.executable, "-m", "studio", "patchcore", "--data", str(leaking_export),
                           "--positives", str(leaking_export), "--backbone", "random", "--size", "64",
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "evaluat" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_provenance_refuses_what_the_pixels_do_not_show(tmp_path, bottle_roles):
    """A sample changed beyond recognition is not a near-duplicate, but its provenance says it
    descends from an evaluation image: refused all the same."""
    import json
    from PIL import Image
    from studio.evaluation import PatchCoreRequest, run_patchcore
    x = tmp_path / "x"
    (x / "synthetic" / "contamination").mkdir(parents=True)
    (x / "synthetic_ground_truth" / "contamination").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(x / "synthetic" / "contamination" / "000.png")
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 10:30] = 255
    Image.fromarray(m).save(x / "synthetic_ground_truth" / "contamination" / "000_mask.png")
    (x / "provenance.jsonl").write_text(json.dumps({"file": "synthetic/contamination/000.png",
                                                    "descends_from": sorted(bottle_roles.evaluation_hashes)[:1]}) + "\n")
    with pytest.raises(R.LeakageError, match="descend from real images that are evaluated"):
        run_patchcore(PatchCoreRequest(data=str(BOTTLE), out=str(tmp_path / "pc"), bank="dual-real-synthetic",
                                       positives=str(x), backbone="random", size=64))


def test_clean_synthetic_set_is_accepted(tmp_path):
    """The same flow with a sample on a train/good image is not refused (the check is not a blanket no)."""
    from studio.evaluation import PatchCoreRequest, run_patchcore
    from studio.services import GenerateRequest, generate, review
    store = Store(tmp_path / "ws")
    store.import_mvtec(BOTTLE)
    good = store.list_images(label="good", split="train")[0]
    img = store.load_image(good["id"])
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[20:50, 20:50] = 255
    for c in generate(GenerateRequest(image=img, mask=mask, damage_type="contamination", product="bottle",
                                      backend="cutpaste", n=2, source_image_id=good["id"]), store=store):
        review(store, c.sample_id, "accepted")
    root = Path(store.export_mvtec(tmp_path / "export", "bottle")["path"])
    res = run_patchcore(PatchCoreRequest(data=str(root), out=str(tmp_path / "pc"), bank="dual-real-synthetic",
                                         positives=str(root), backbone="random", size=64, max_overlays=0))
    assert res["metrics"]["n_positive_images"] == len(R.folder_roles(root).reference) + 2
    store.close()


def test_roles_cli_lists_folder_split_and_sets_roles(tmp_path, bottle_roles):
    import json
    run = lambda *a: subprocess.run([sys.executable, "-m", "studio", *a], capture_output=True, text=True, cwd=ROOT)
    proc = run("roles", "--data", str(BOTTLE))
    assert proc.returncode == 0
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert {x["file"] for x in lines if x["role"] == "evaluation"} == set(bottle_roles.rel(bottle_roles.evaluation))
    ws = str(tmp_path / "ws")
    assert run("import", str(BOTTLE), "--workspace", ws).returncode == 0
    rows = [json.loads(x) for x in run("roles", "--workspace", ws).stdout.splitlines()]
    ref = next(r for r in rows if r["role"] == "reference")
    out = run("roles", "--workspace", ws, "--set", str(ref["id"]), "evaluation")
    assert out.returncode == 0 and json.loads(out.stdout)["role"] == "evaluation"
    bad = run("roles", "--workspace", ws, "--set", str(ref["id"]), "train")
    assert bad.returncode != 0 and "unknown role" in bad.stderr and "Traceback" not in bad.stderr
