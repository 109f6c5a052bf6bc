"""Formats in their own modules: layout detection, the one mask-naming rule, KolektorSDD2 import."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.mvtec import find_mask, mask_filename
from studio.dataset import Store, StoreError
from studio.formats import detect, import_any

ROOT = Path(__file__).resolve().parent.parent


def _ksdd2(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n_good, n_bad in (("train", 3, 2), ("test", 2, 2)):
        (root / split).mkdir(parents=True)
        for i in range(n_good + n_bad):
            img = rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)
            gt = np.zeros((40, 24), np.uint8)
            if i >= n_good:
                gt[10:20, 5:12] = 255
            Image.fromarray(img).save(root / split / f"{i:05d}.png")
            Image.fromarray(gt).save(root / split / f"{i:05d}_GT.png")
    return root


def test_one_mask_naming_rule(tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    assert find_mask(gt, tmp_path / "000.png") is None
    (gt / "001.png").write_bytes(b"x")
    assert find_mask(gt, tmp_path / "001.jpg") == gt / "001.png"           # VisA / plain folders
    (gt / mask_filename("001")).write_bytes(b"x")
    assert find_mask(gt, tmp_path / "001.jpg") == gt / "001_mask.png"      # MVTec AD first
    assert find_mask(gt, "001") == gt / "001_mask.png"


def test_ksdd2_import_labels_masks_roles_and_detection(tmp_path):
    root = _ksdd2(tmp_path / "KolektorSDD2")
    assert detect(root) == "ksdd2" and detect(ROOT / "assets" / "demo" / "bottle") == "mvtec"
    store = Store(tmp_path / "ws")
    rep = import_any(store, root)
    assert rep["kind"] == "ksdd2" and rep["images"] == 9 and rep["skipped"] == []
    rows = store.list_images(product="KolektorSDD2")
    assert sorted((r["split"], r["label"]) for r in rows).count(("train", "good")) == 3
    defects = [r for r in rows if r["label"] == "defect"]
    assert len(defects) == 4 and all(r["mask_path"] and r["role"] in ("reference", "evaluation") for r in defects)
    m = store.load_mask(defects[0]["id"])
    assert m.shape == (40, 24) and set(np.unique(m)) == {0, 255}
    assert all(r["mask_path"] is None for r in rows if r["label"] == "good")   # all-black GT = good
    assert import_any(store, root)["imported"] == 0                           # idempotent
    with pytest.raises(StoreError, match="product name"):
        import_any(store, tmp_path, "folder")


def test_cli_import_detects_ksdd2(tmp_path):
    root = _ksdd2(tmp_path / "k")
    proc = subprocess.run([sys.executable, "-m", "studio", "import", str(root), "--workspace", str(tmp_path / "ws")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "ksdd2"
    bad = subprocess.run([sys.executable, "-m", "studio", "import", str(tmp_path / "nope"), "--workspace",
                          str(tmp_path / "ws")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
