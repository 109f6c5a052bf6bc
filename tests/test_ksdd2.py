"""KolektorSDD2 layout end to end (a toy folder made here: procedural strips, a separable defect):
auto-detected import, export to the MVTec layout, PatchCore from the CLI on the folder itself
(metrics file), and the positive bank's own coreset rate (``--positive-coreset``)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.mvtec import LayoutError, is_ksdd2, load_category, load_mask
from studio.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
H, W = 96, 40          # KolektorSDD2 strips are tall and narrow (~630 × 230)


def _strip(rng) -> np.ndarray:
    """A brushed grey strip: vertical streaks + noise (RGB uint8)."""
    cols = 120 + 20 * np.sin(np.arange(W) / 3.0 + rng.uniform(0, 6))
    img = np.repeat(cols[None, :], H, axis=0) + rng.normal(0, 4, (H, W))
    return np.clip(np.repeat(img[..., None], 3, axis=2), 0, 255).astype(np.uint8)


def _defect(img, rng, gt_value: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptic spot (separable from the streaks) and its ground truth."""
    y, x = int(rng.integers(20, H - 20)), int(rng.integers(10, W - 10))
    gt = np.zeros((H, W), np.uint8)
    cv2.ellipse(gt, (x, y), (6, 10), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    out = img.copy()
    out[gt > 0] = (out[gt > 0] * 0.25).astype(np.uint8)
    return out, gt * gt_value


def make_ksdd2(root: Path, n_train_good=10, n_train_bad=2, n_test_good=6, n_test_bad=6, seed=0) -> Path:
    """``root/train/NNNNN.png`` + ``NNNNN_GT.png``, ``root/test/…``; good images get an all-black
    GT; test defects use 0/1 ground truths (as some KolektorSDD2 copies do), train ones 0/255."""
    rng = np.random.default_rng(seed)
    k = 10000
    for split, n_good, n_bad, gt_value in (("train", n_train_good, n_train_bad, 255),
                                           ("test", n_test_good, n_test_bad, 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n_good + n_bad):
            img = _strip(rng)
            gt = np.zeros((H, W), np.uint8)
            if i >= n_good:
                img, gt = _defect(img, rng, gt_value)
            cv2.imwrite(str(root / split / f"{k:05d}.png"), img[..., ::-1])
            cv2.imwrite(str(root / split / f"{k:05d}_GT.png"), gt)
            k += 1
    return root


@pytest.fixture(scope="module")
def ksdd2(tmp_path_factory) -> Path:
    return make_ksdd2(tmp_path_factory.mktemp("ksdd2") / "KolektorSDD2")


def test_reader_reads_the_layout(ksdd2, tmp_path):
    assert is_ksdd2(ksdd2)
    cat = load_category(ksdd2)
    assert len(cat.train) == 10                       # good train images only
    assert sorted({s.label for s in cat.test}) == ["defect", "good"] and cat.defect_types == ["defect"]
    assert sum(s.is_anomaly for s in cat.test) == 6
    bad = next(s for s in cat.test if s.is_anomaly)
    assert bad.mask_path.name == f"{bad.path.stem}_GT.png"
    assert load_mask(bad, None).sum() > 50            # a 0/1 ground truth still reads as the defect
    # an image without its ground truth: a one-line layout error naming it
    broken = make_ksdd2(tmp_path / "broken", n_train_good=3, n_train_bad=0, n_test_good=1, n_test_bad=1)
    next((broken / "test").glob("*_GT.png")).unlink()
    with pytest.raises(LayoutError, match="has no ground truth"):
        load_category(broken)


def test_import_is_auto_detected_and_exports(ksdd2, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["import", str(ksdd2), "--workspace", str(ws)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "ksdd2" and report["product"] == "KolektorSDD2" and report["images"] == 24
    from studio.dataset import Store
    store = Store(ws)
    rows = store.list_images(product="KolektorSDD2")
    count = {(r["split"], r["label"]): 0 for r in rows}
    for r in rows:
        count[(r["split"], r["label"])] += 1
    assert count == {("train", "good"): 10, ("train", "defect"): 2, ("test", "good"): 6, ("test", "defect"): 6}
    bad = next(r for r in rows if r["label"] == "defect" and r["split"] == "test")
    assert set(np.unique(store.load_mask(bad["id"]))) == {0, 255}      # 0/1 GT binarised to 0/255
    # the layout named explicitly (the specification's `import --layout ksdd2`) imports the same
    assert main(["import", str(ksdd2), "--layout", "ksdd2", "--workspace", str(tmp_path / "ws2")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 24
    assert main(["export", "--product", "KolektorSDD2", "--out", str(tmp_path / "exp"),
                 "--workspace", str(ws)]) == 0
    cat = load_category(tmp_path / "exp" / "KolektorSDD2")            # the MVTec layout
    assert len(cat.train) == 10 and sum(s.is_anomaly for s in cat.test) == 6


def test_patchcore_cli_on_a_ksdd2_folder(ksdd2, tmp_path):
    out = tmp_path / "pc"
    r = subprocess.run([sys.executable, "-m", "studio", "patchcore", "--data", str(ksdd2), "--out", str(out),
                        "--size", "64", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_train"] == 10 and m["n_test"] == 12
    assert m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.9, m    # the dark spot is separable
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["coreset"] == 0.05 and cfg["positive_coreset"] == 0.1


def test_positive_coreset_keeps_ceil_of_its_rate_and_a_cell_per_defect(ksdd2, tmp_path):
    from pipelines.patchcore import PatchCore
    cat = load_category(ksdd2)
    bad = [s for s in cat.test if s.is_anomaly]
    imgs = [cv2.resize(cv2.imread(str(s.path))[..., ::-1], (64, 64)) for s in bad]
    masks = [load_mask(s, 64) for s in bad]
    full = PatchCore(backbone="random", size=64, positive_coreset=1.0).fit(imgs[:2])
    full.fit_positive(imgs, masks)
    eligible = full.positive_bank_size
    assert eligible > 10
    pc = PatchCore(backbone="random", size=64).fit(imgs[:2])              # default: 10 %
    pc.fit_positive(imgs, masks)
    assert pc.config["positive_coreset"] == 0.1
    n_defects = sum(bool(np.asarray(m).any()) for m in masks)
    # ceil(rate · eligible cells), but at least one cell per defect image (6 small defects here)
    assert pc.positive_bank_size == max(n_defects, math.ceil(0.1 * eligible)) == n_defects
    half = PatchCore(backbone="random", size=64, positive_coreset=0.5).fit(imgs[:2])
    half.fit_positive(imgs, masks)
    assert math.ceil(0.5 * eligible) > n_defects                      # the rate decides here
    assert half.positive_bank_size == math.ceil(0.5 * eligible)
    # the kept rows are eligible defect cells, and the rate survives save → load
    assert all(any(torch_equal(row, e) for e in full.positive_bank) for row in pc.positive_bank)
    loaded = PatchCore.load(pc.save(tmp_path / "m"))
    assert loaded.config["positive_coreset"] == 0.1 and loaded.positive_bank_size == pc.positive_bank_size
    with pytest.raises(ValueError, match="positive_coreset"):
        PatchCore(backbone="random", size=64, positive_coreset=0)


def torch_equal(a, b) -> bool:
    import torch
    return bool(torch.equal(a, b))


def test_coreset_flags_in_help():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    text = " ".join(sub.choices["patchcore"].format_help().split())
    assert "--positive-coreset" in text and "--coreset" in text
    assert "0.05" in text and "0.960 vs 0.971" in text and "KolektorSDD2" in text
    args = build_parser().parse_args(["patchcore", "--data", "x", "--out", "y"])
    assert args.coreset == 0.05 and args.positive_coreset == 0.1


@pytest.mark.slow
def test_experiment_on_a_ksdd2_folder(ksdd2, tmp_path):
    """The experiment reads the folder as it is (~40 s on 2 cores): reference defects come from
    test/, the positive bank's coreset rate is recorded in the protocol."""
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, "-m", "studio", "experiment", "--data", str(ksdd2), "--generate", "perlin",
                        "--per-type", "3", "--repeats", "1", "--size", "64", "--segmenter-steps", "10",
                        "--bootstrap", "100", "--positive-coreset", "0.1", "--quiet", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"]["positive_coreset"] == 0.1
    assert all(p.startswith("test/") for p in m["protocol"]["reference"] + m["protocol"]["evaluation"])
