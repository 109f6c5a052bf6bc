"""Leak canaries: an evaluation image, its JPEG q=90 copy and its 0.5× resized copy planted in every
route that learns from or copies defects — the trainers' reference data (``--data``), their
``extra_data``, PatchCore's ``--positives``, the store's donors — through the Python API, the CLI
and the Training / PatchCore tabs (gradio_client). Each is refused with the file named; a clean
export used as ``extra_data`` trains and records 0 evaluation ancestors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines import roles as R
from pipelines.imageio import read_mask, read_rgb
from conftest import DEMO, free_port, start_app, stop_app

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = DEMO / "bottle"


def _half(a):
    return cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)


def plant(img: np.ndarray, mask: np.ndarray, img_dir: Path, gt_dir: Path, prefix: str = "planted") -> list[str]:
    """Write the three copies of an evaluation image (exact as .bmp, JPEG q=90, 0.5× PNG) + masks."""
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for tag, ext, arr, m in (("exact", ".bmp", img, mask), ("jpeg", ".jpg", img, mask),
                             ("half", ".png", _half(img), cv2.resize(mask, (mask.shape[1] // 2, mask.shape[0] // 2),
                                                                    interpolation=cv2.INTER_NEAREST))):
        name = f"{prefix}_{tag}{ext}"
        Image.fromarray(arr).save(img_dir / name, **({"quality": 90} if ext == ".jpg" else {}))
        Image.fromarray(m).save(gt_dir / f"{prefix}_{tag}_mask.png")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    """A copy of the demo bottle with its split pinned (evaluation.txt, as every export writes) and
    the evaluation image the canaries copy."""
    root = tmp_path_factory.mktemp("canary") / "bottle"
    shutil.copytree(BOTTLE, root)
    roles = R.folder_roles(root)
    (root / R.EVALUATION_FILE).write_text("".join(f + "\n" for f in roles.rel(roles.evaluation)))
    victim = roles.evaluation[0]
    return root, roles, victim, str(victim.path.relative_to(root))


def _clean_synthetic(root: Path, dest: Path, label: str, n: int = 2) -> None:
    """Accepted-looking synthetic samples painted on train/good images (not scored)."""
    (dest / "synthetic" / label).mkdir(parents=True, exist_ok=True)
    (dest / "synthetic_ground_truth" / label).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted((root / "train" / "good").glob("*.png"))[:n]):
        img = np.array(read_rgb(p))
        m = np.zeros(img.shape[:2], np.uint8)
        m[100:130, 100:140] = 255
        img[m > 0] = (img[m > 0] * 0.4).astype(np.uint8)
        Image.fromarray(img).save(dest / "synthetic" / label / f"{i:03d}.png")
        Image.fromarray(m).save(dest / "synthetic_ground_truth" / label / f"{i:03d}_mask.png")


@pytest.fixture(scope="module")
def planted_export(product, tmp_path_factory):
    """An export-shaped folder whose synthetic/ holds the three copies of the evaluation image."""
    root, roles, victim, _ = product
    x = tmp_path_factory.mktemp("planted") / "bottle"
    names = plant(read_rgb(victim.path), read_mask(victim.mask_path), x / "synthetic" / victim.label,
                  x / "synthetic_ground_truth" / victim.label)
    return x, names


def _run(*args):
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------
# trainers: --data (reference defects) and extra_data
def test_copies_planted_as_reference_defects_are_refused(product, tmp_path):
    from pipelines.training import training_data
    root, roles, victim, vname = product
    data = tmp_path / "bottle"
    shutil.copytree(root, data)
    names = plant(read_rgb(victim.path), read_mask(victim.mask_path), data / "test" / victim.label,
                  data / "ground_truth" / victim.label)
    with pytest.raises(R.LeakageError) as exc:
        training_data(data, size=64, purpose="pixel-inpaint training data")
    msg = str(exc.value)
    # the exact copy hashes like the evaluation image: the roles make it evaluation, never reference
    r = R.folder_roles(data)
    assert f"test/{victim.label}/{names[0]}" in r.rel(r.evaluation)
    for n in names[1:]:                                   # the JPEG and the resized copy: refused by the guard
        assert f"test/{victim.label}/{n} equals the evaluation image {vname} (near-duplicate" in msg
    assert "2 of" in msg


@pytest.mark.parametrize("which", [0, 1, 2])
def test_each_copy_in_extra_data_is_refused(product, planted_export, tmp_path, which):
    from pipelines.training import training_data
    root, _, victim, vname = product
    x, names = planted_export
    one = tmp_path / "one"
    for sub in ("synthetic", "synthetic_ground_truth"):
        (one / sub / victim.label).mkdir(parents=True)
    stem = Path(names[which]).stem
    shutil.copy(x / "synthetic" / victim.label / names[which], one / "synthetic" / victim.label)
    shutil.copy(x / "synthetic_ground_truth" / victim.label / f"{stem}_mask.png", one / "synthetic_ground_truth" / victim.label)
    with pytest.raises(R.LeakageError, match=rf"{names[which]} equals the evaluation image {vname} "
                                             rf"\((pixel-identical|near-duplicate)"):
        training_data(root, extra=one, size=64)


def test_extra_data_without_synthetic_is_refused(product):
    from pipelines.training import TrainDataError, training_data
    root = product[0]
    with pytest.raises(TrainDataError, match="holds no synthetic/ folder"):
        training_data(root, extra=root, size=64)          # an export's test/ is never read


def test_train_cli_refuses_the_planted_extra_data(product, planted_export, tmp_path):
    root, _, _, vname = product
    x, names = planted_export
    proc = _run("train", "--kind", "pixel-inpaint", "--data", str(root), "--extra-data", str(x), "--steps", "1",
                "--image-size", "64", "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    for n in names:
        assert n in proc.stderr
    assert f"equals the evaluation image {vname}" in proc.stderr and "3 of" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_clean_export_as_extra_data_trains_with_no_evaluation_ancestor(product, tmp_path):
    """Happy path: the export's test/ holds every evaluation image (and here even a planted copy):
    it is not read; the synthetic samples are trained on; training_data.json records the fit."""
    root, roles, victim, _ = product
    x = tmp_path / "export" / "bottle"
    shutil.copytree(root, x)                                # test/ with the evaluation images, as exported
    plant(read_rgb(victim.path), read_mask(victim.mask_path), x / "test" / victim.label,
          x / "ground_truth" / victim.label)
    _clean_synthetic(root, x, "contamination", 2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("preset: tiny\nresolution: 32\nmin_crop: 32\nbatch_size: 2\nlog_every: 1\n"
                   "validate_every: 0\ncheckpoint_every: 2\ngood_fraction: 0.0\n")
    out = tmp_path / "run"
    proc = _run("train", "--kind", "pixel-inpaint", "--config", str(cfg), "--data", str(root), "--extra-data",
                str(x), "--steps", "2", "--image-size", "64", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    man = json.loads((out / "training_data.json").read_text())
    assert man["evaluation_ancestors"] == 0
    assert man["counts"] == {"reference": len(roles.reference), "synthetic": 2, "evaluation": 0}
    assert len(man["fit_hashes"]) == len(roles.reference) + 2
    assert not set(man["fit_hashes"]) & roles.evaluation_hashes
    assert not set(man["ancestors"]) & roles.evaluation_hashes


# ------------------------------------------------------------------------------------------------
# PatchCore: --positives
def test_patchcore_cli_refuses_planted_positives_and_a_folder_without_synthetic(product, planted_export, tmp_path):
    root, _, _, vname = product
    x, names = planted_export
    proc = _run("patchcore", "--data", str(root), "--positives", str(x), "--backbone", "random", "--size", "64",
                "--out", str(tmp_path / "pc"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "PatchCore positive bank:" in proc.stderr and f"equals the evaluation image {vname}" in proc.stderr
    for n in names:
        assert n in proc.stderr
    assert not (tmp_path / "pc" / "metrics.json").exists()
    # an MVTec export without synthetic/: refused (it used to fall back to test/, the evaluation defects)
    proc = _run("patchcore", "--data", str(root), "--positives", str(root), "--backbone", "random", "--size", "64",
                "--out", str(tmp_path / "pc2"))
    assert proc.returncode != 0 and "holds no synthetic/ folder" in proc.stderr
    assert "python -m studio export" in proc.stderr and not (tmp_path / "pc2" / "metrics.json").exists()


def test_patchcore_clean_positives_record_the_fit(product, tmp_path):
    from studio.evaluation import PatchCoreRequest, run_patchcore
    root, roles, _, _ = product
    x = tmp_path / "clean"
    _clean_synthetic(root, x, "contamination", 2)
    res = run_patchcore(PatchCoreRequest(data=str(root), out=str(tmp_path / "pc"), bank="dual-real-synthetic",
                                         positives=str(x), backbone="random", size=64, max_overlays=0))
    m = json.loads((tmp_path / "pc" / "metrics.json").read_text())
    assert m["positive_fit_hashes"] == len(roles.reference) + 2 and m["positive_evaluation"] == 0
    assert len(res["scored_hashes"]) == len(roles.evaluation) + len(roles.good)


# ------------------------------------------------------------------------------------------------
# the store: donors and the shape model
def test_store_donor_that_copies_an_evaluation_image_is_refused(tmp_path):
    from studio.dataset import Store
    from studio.services import GenerateRequest, UserError, generate, shape_model
    store = Store(tmp_path / "ws")
    store.import_mvtec(BOTTLE)
    victim = next(r for r in store.list_images(product="bottle", role="evaluation"))
    img, mask = store.load_image(victim["id"]), store.load_mask(victim["id"])
    src = tmp_path / "plant" / "bottle"
    plant(img, mask, src / "test" / victim["label"], src / "ground_truth" / victim["label"], prefix="zz")
    store.import_mvtec(src, product="bottle")
    planted = [r for r in store.list_images(product="bottle", label=victim["label"])
               if "zz_" in (r["source_path"] or "")]
    for r in planted:
        store.set_role(r["id"], "reference")
    good = store.list_images(product="bottle", label="good", split="train")[0]
    m = np.zeros(img.shape[:2], np.uint8)
    m[40:70, 40:80] = 255
    with pytest.raises(UserError, match=r"cutpaste donors .*equals the evaluation image image \d+"):
        generate(GenerateRequest(image=store.load_image(good["id"]), mask=m, damage_type=victim["label"],
                                 product="bottle", backend="cutpaste", n=1, source_image_id=good["id"]), store=store)
    with pytest.raises(UserError, match="shape model"):
        shape_model(store, "bottle", victim["label"])
    store.close()


def test_role_change_marks_the_runs_that_scored_the_image_stale(tmp_path):
    from studio.dataset import Store
    from studio.evaluation import PatchCoreRequest, run_patchcore
    from studio.runs import RunLog
    from studio.ui.patchcore_tab import runs_frame
    ws = tmp_path / "ws"
    store = Store(ws)
    store.import_mvtec(BOTTLE)
    root = Path(store.export_mvtec(tmp_path / "export", "bottle")["path"])
    log = RunLog(ws)
    rid = log.start("patchcore", "bottle", str(root), {}, str(tmp_path / "pc"))
    res = run_patchcore(PatchCoreRequest(data=str(root), out=str(tmp_path / "pc"), bank="dual-real",
                                         backbone="random", size=64, max_overlays=0))
    log.finish(rid, res["metrics"], scored=res["scored_hashes"])
    other = log.start("patchcore", "bottle", str(root), {}, str(tmp_path / "x"))
    log.finish(other, {}, scored=[])
    victim = store.list_images(product="bottle", role="evaluation")[0]
    row = store.set_role(victim["id"], "reference")
    assert row["stale_runs"] == [rid]
    got = {r["id"]: r for r in log.list("patchcore")}
    assert got[rid]["stale"].startswith(f"stale: image {victim['id']} (bottle/") and "is now reference" in got[rid]["stale"]
    assert not got[other]["stale"]
    frame = runs_frame(log)
    assert frame.set_index("id").loc[rid, "stale"].startswith("stale: image")
    assert store.set_role(victim["id"], "evaluation")["stale_runs"] == []     # back to evaluation: nothing new
    proc = _run("runs", "--workspace", str(ws))
    assert proc.returncode == 0
    lines = {json.loads(x)["id"]: json.loads(x) for x in proc.stdout.splitlines()}
    assert "is now reference" in lines[rid]["stale"] and lines[other]["stale"] is None
    store.close()


# ------------------------------------------------------------------------------------------------
# the tabs, as a user drives them (gradio_client)
@pytest.fixture(scope="module")
def planted_server(tmp_path_factory):
    """A studio on a fresh workspace whose bottle holds three accepted 'synthetic' samples that are
    copies of one evaluation image (imported through the Dataset tab)."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client
    base = tmp_path_factory.mktemp("canary-app")
    ws = base / "workspace"
    ws.mkdir()
    proc, url, _ = start_app(ws, free_port())
    try:
        roles = R.folder_roles(BOTTLE)
        victim = roles.evaluation[0]
        src = base / "plant"
        plant(read_rgb(victim.path), read_mask(victim.mask_path), src / "synthetic" / victim.label,
              src / "synthetic_ground_truth" / victim.label)
        c = Client(url, verbose=False)
        status, _ = c.predict(str(src), "mvtec", "bottle", api_name="/import_folder")
        assert '"samples": 3' in status, status
        yield c, ws
    finally:
        stop_app(proc)


def _wait(client, prefix, jid, timeout=300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.predict(jid, api_name=f"/{prefix}_job")
        if job["status"] not in ("running", "queued"):
            return job
        time.sleep(1)
    raise AssertionError(f"{prefix} job {jid} did not finish")


@pytest.mark.slow
def test_training_tab_refuses_planted_synthetic_before_it_starts(planted_server):
    c, ws = planted_server
    kind = "pixel-inpaint (offline, trains from scratch)"
    with pytest.raises(Exception) as exc:
        c.predict(kind, "bottle", [], "real + accepted synthetic", "", "canary", 15, 1, 4, 0, True,
                  api_name="/train_start")
    msg = str(exc.value)
    assert "pixel-inpaint training data:" in msg and "equals the evaluation image test/" in msg
    assert "3 of" in msg and msg.count("(sample ") >= 3               # each planted file named
    assert not (ws / "adapters" / "canary" / "checkpoints").exists()
    # real only: the reference defects train (the planted samples are not read); the count is said first
    jid, status, _ = c.predict(kind, "bottle", [], "real only", "", "canary", 15, 1, 4, 0, True,
                               api_name="/train_start")
    assert "Training on " in status and "reference defect" in status and "(0 evaluation images)" in status
    job = _wait(c, "train", jid)
    assert job["status"] == "done", job.get("error")
    man = json.loads((ws / "adapters" / "canary" / "training_data.json").read_text())
    assert man["evaluation_ancestors"] == 0 and man["counts"]["evaluation"] == 0


@pytest.mark.slow
def test_patchcore_tab_refuses_planted_synthetic_positives(planted_server):
    c, ws = planted_server
    jid, _, _ = c.predict("bottle", "", "dual: + real + accepted synthetic", "efficientnet_lite0", 5, 256,
                          api_name="/patchcore_start")
    job = _wait(c, "patchcore", jid)
    assert job["status"] == "failed"
    assert "PatchCore positive bank:" in job["error"] and "equals the evaluation image test/" in job["error"]
    assert "3 of" in job["error"]


def test_wall_panel_refuses_a_photo_that_copies_a_scored_image(tmp_path):
    import gradio as gr
    from studio.config import Settings
    from studio.context import StudioContext
    from studio.ui import training_wall as TW
    ctx = StudioContext(Settings.from_env(workspace=tmp_path / "ws"))
    ctx.store.import_mvtec(BOTTLE)
    victim = R.folder_roles(BOTTLE).good[0]                    # test/good is scored too
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    (photos / "masks").mkdir()
    Image.fromarray(read_rgb(victim.path)).save(photos / "images" / "wall1.jpg", quality=90)
    m = np.zeros((256, 256), np.uint8)
    m[:, :128] = 255
    Image.fromarray(m).save(photos / "masks" / "wall1.png")
    args = dict(folder=str(photos), masks="", model=str(tmp_path / "m"), name="", minutes=15, steps=3, rank=4,
                prob=0.3, reference=list(TW.REFERENCES)[2], method="kmeans", color_loss=0.5, colors="", resume=False)
    with pytest.raises(gr.Error, match=r"wall training data \(product bottle\): .*wall1.jpg equals the evaluation image"):
        TW.wall_command(ctx, *args.values())


@pytest.mark.slow
def test_curation_experiment_refuses_planted_synthetic_samples(planted_server):
    """The Curation tab's experiment exports the product and compares its accepted samples: the
    three planted copies of an evaluation image are refused where the export is read, each named."""
    c, ws = planted_server
    jid, _, _ = c.predict("bottle", 1, [], 2, api_name="/experiment_start")
    job = _wait(c, "experiment", jid)
    assert job["status"] == "failed"
    assert "experiment --synthetic" in job["error"] and "equals the evaluation image test/" in job["error"]
    assert "3 of" in job["error"]
