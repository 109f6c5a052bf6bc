"""`python -m studio patchcore` on the demo data, and its clear failures on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


def run(*args):
    return subprocess.run([sys.executable, "-m", "studio", "patchcore", *map(str, args), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_patchcore_cli_on_demo_bottle(tmp_path):
    r = run("--data", DEMO / "bottle", "--coreset", 0.05, "--out", tmp_path / "pc")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "pc" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "fit_seconds",
                "ms_per_image", "backbone_ms_per_image"):
        assert key in m
    assert m["image_auroc"] >= 0.99 and m["pixel_auroc"] >= 0.97
    assert len(list((tmp_path / "pc" / "overlays").glob("*.png"))) == 23


def test_bad_inputs(tmp_path):
    r = run("--data", DEMO, "--out", tmp_path / "x")  # the parent of the categories
    assert r.returncode != 0 and "no train/good" in r.stderr and "Traceback" not in r.stderr

    broken = tmp_path / "bottle"
    shutil.copytree(DEMO / "bottle", broken)
    (broken / "ground_truth" / "contamination" / "002_mask.png").unlink()
    r = run("--data", broken, "--out", tmp_path / "y")
    assert r.returncode != 0 and "has no ground-truth mask" in r.stderr

    r = run("--data", DEMO / "bottle", "--backbone", "resnet18", "--out", tmp_path / "z")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "resnet18" in r.stderr

    r = run("--data", DEMO / "bottle", "--backbone", "vgg99", "--out", tmp_path / "z")
    assert r.returncode != 0 and "efficientnet_lite0" in r.stderr  # lists the known names

    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a state dict" * 10)
    r = subprocess.run([sys.executable, "-c", "from pipelines.backbones import build_backbone; "
                        f"build_backbone('resnet18', weights={str(bad)!r})"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "corrupt" in r.stderr.lower()


def test_mixed_sizes_are_noted_and_mask_of_another_size_is_refused(tmp_path):
    import cv2

    from pipelines.mvtec import check_sizes, load_category

    cat_dir = tmp_path / "bottle"
    shutil.copytree(DEMO / "bottle", cat_dir)
    assert check_sizes(load_category(cat_dir)) == []          # the demo: one size, square
    odd = sorted((cat_dir / "train" / "good").glob("*.png"))[0]
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(odd)), (300, 200)))
    notes = check_sizes(load_category(cat_dir))
    assert "2 sizes" in notes[0] and "256×256 (" in notes[0] and "300×200 (1)" in notes[0]
    assert "non-square" in notes[1]

    mask = sorted((cat_dir / "ground_truth" / "contamination").glob("*.png"))[0]
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE), (128, 128),
                                      interpolation=cv2.INTER_NEAREST))
    r = run("--data", cat_dir, "--out", tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "must have its image's size" in r.stderr and mask.name in r.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_orient_and_tiles_flags(tmp_path):
    """--orient / --tiles reach the model and are recorded in metrics.json, result.json and the
    saved model (a tiny synthetic category of parts at random angles)."""
    from tests.test_patchcore_orient import part

    cat = tmp_path / "part"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (cat / folder).mkdir(parents=True)
    for i, angle in enumerate((0, 70, 150, 220, 300)):
        cv2_write(cat / "train" / "good" / f"{i:03d}.png", part(i, angle))
    for i, angle in enumerate((40, 190)):
        cv2_write(cat / "test" / "good" / f"{i:03d}.png", part(10 + i, angle))
        cv2_write(cat / "test" / "spot" / f"{i:03d}.png", part(20 + i, angle, defect=(90, 64)))
        import cv2
        import numpy as np
        mask = np.zeros((128, 128), np.uint8)
        cv2.circle(mask, (90, 64), 4, 255, -1)
        M = cv2.getRotationMatrix2D((63.5, 63.5), angle, 1.0)
        cv2_write(cat / "ground_truth" / "spot" / f"{i:03d}_mask.png",
                  cv2.warpAffine(mask, M, (128, 128), flags=cv2.INTER_NEAREST))
    r = run("--data", cat, "--backbone", "random", "--size", 64, "--orient", "canonical", "--tiles", 2,
            "--out", tmp_path / "pc")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "pc" / "metrics.json").read_text())
    assert (m["orient"], m["orient_requested"], m["tiles"]) == ("canonical", "canonical", 2)
    assert json.loads((tmp_path / "pc" / "result.json").read_text())["orientation"]["used"] == "canonical"
    saved = json.loads((tmp_path / "pc" / "model" / "config.json").read_text())
    assert saved["orient"] == "canonical" and saved["tiles"] == 2
    r = run("--data", cat, "--backbone", "random", "--size", 64, "--out", tmp_path / "auto")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert m["orient_requested"] == "auto" and m["orient"] in ("none", "canonical")
    assert '"orient"' in r.stdout
    r = run("--data", cat, "--orient", "sideways", "--out", tmp_path / "bad")
    assert r.returncode != 0 and "invalid choice" in r.stderr


def cv2_write(path, img):
    import cv2
    assert cv2.imwrite(str(path), img)
