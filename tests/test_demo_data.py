"""The demo data generator: MVTec layout, determinism, exact masks, the committed copy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.demo_data import PRODUCTS, render_defect, render_good, write_demo_dataset

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
MAX_BYTES = 5_000_000
SMALL = dict(n_train_good=2, n_test_good=1, n_test_per_defect=2)
CASES = [(p, d) for p, ds in PRODUCTS.items() for d in ds]


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_products_are_the_catalogued_ones():
    assert PRODUCTS == {"bottle": ("broken_large", "broken_small", "contamination"),
                        "brushed_metal": ("scratch", "crack", "stain")}


def test_layout_and_counts(tmp_path):
    counts = write_demo_dataset(tmp_path, **SMALL)
    assert set(counts) == set(PRODUCTS)
    for product, damages in PRODUCTS.items():
        assert counts[product] == {"train": {"good": 2},
                                   "test": {"good": 1, **{d: 2 for d in damages}}}
        cat = tmp_path / product
        assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *damages])
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(damages)
        for d in damages:
            images = sorted(p.stem for p in (cat / "test" / d).glob("*.png"))
            masks = sorted(p.stem for p in (cat / "ground_truth" / d).glob("*.png"))
            assert images == ["000", "001"] and masks == [f"{s}_mask" for s in images]
            with Image.open(cat / "test" / d / "000.png") as im:
                assert im.mode == "RGB" and im.size == (256, 256)
            with Image.open(cat / "ground_truth" / d / "000_mask.png") as m:
                assert m.mode == "L" and m.size == (256, 256)
                values = set(np.unique(np.asarray(m)).tolist())
            assert values == {0, 255}
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"


def test_deterministic_and_independent_of_products_and_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_demo_dataset(a, **SMALL, workers=1)
    write_demo_dataset(b, **SMALL, workers=3)
    assert _files(a) == _files(b)
    # one product alone, fewer files: the shared files are byte-identical
    write_demo_dataset(c, products=["brushed_metal"], n_train_good=1, n_test_good=1, n_test_per_defect=1)
    fc, fa = _files(c), _files(a)
    assert fc and all(fa[name] == data for name, data in fc.items())
    # another seed gives other images
    write_demo_dataset(tmp_path / "d", products=["bottle"], n_train_good=1, n_test_good=0,
                       n_test_per_defect=0, seed=1)
    name = "bottle/train/good/000.png"
    assert (tmp_path / "d" / name).read_bytes() != fa[name]


@pytest.mark.parametrize("product,damage", CASES)
def test_masks_are_exact(product, damage):
    for seed in range(3):
        image, mask, base = render_defect(product, damage, np.random.default_rng(seed), return_base=True)
        good = render_good(product, np.random.default_rng(seed))
        assert np.array_equal(base, good), "the defect is not painted on the good image"
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}
        inside = mask == 255
        assert 50 <= inside.sum() <= 0.25 * mask.size
        assert np.array_equal(image[~inside], base[~inside]), "pixels changed outside the mask"
        change = np.abs(image.astype(np.int16) - base.astype(np.int16)).max(axis=2)[inside]
        assert change.mean() > 12, f"defect too faint: mean change {change.mean():.1f}"
        assert (change >= 4).mean() > 0.85, "many mask pixels are not visibly changed"
        # the two-tuple form gives the same thing
        image2, mask2 = render_defect(product, damage, np.random.default_rng(seed))
        assert np.array_equal(image, image2) and np.array_equal(mask, mask2)


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_good_images_vary_but_little(product):
    goods = [render_good(product, np.random.default_rng(s)).astype(np.float64) for s in range(6)]
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    assert min(np.abs(goods[i] - goods[j]).mean() for i, j in pairs) > 1.0, "identical good images"
    # same product: exposure within a few %, same layout at a coarse scale (8 x 8 blocks)
    means = np.array([g.mean() for g in goods])
    assert means.std() < 0.06 * means.mean()
    coarse = [cv2.resize(g, (8, 8), interpolation=cv2.INTER_AREA) for g in goods]
    worst = max(np.abs(coarse[i] - coarse[j]).mean() for i, j in pairs)
    assert worst < 0.25 * means.mean(), f"good images differ too much: {worst:.1f}"


@pytest.mark.parametrize("size", [256, 512])
def test_sizes(size):
    for product, damages in PRODUCTS.items():
        assert render_good(product, np.random.default_rng(0), size).shape == (size, size, 3)
        image, mask = render_defect(product, damages[0], np.random.default_rng(0), size)
        assert image.shape == (size, size, 3) and mask.shape == (size, size) and mask.any()


def test_unknown_names_list_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="bottle, brushed_metal"):
        render_good("carpet", np.random.default_rng(0))
    with pytest.raises(ValueError, match="scratch, crack, stain"):
        render_defect("brushed_metal", "broken_large", np.random.default_rng(0))
    with pytest.raises(ValueError, match="Known: bottle"):
        write_demo_dataset(tmp_path, products=["nope"])
    with pytest.raises(ValueError, match="size"):
        render_good("bottle", np.random.default_rng(0), size=16)
    with pytest.raises(ValueError, match="n_test_good"):
        write_demo_dataset(tmp_path, n_test_good=-1)


def test_pipelines_layer_imports_no_ui():
    code = ("import sys, pipelines.demo_data; "
            "bad = [m for m in ('gradio', 'studio') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_writes_a_dataset(tmp_path):
    from pipelines.demo_data import main
    assert main([str(tmp_path), "--products", "bottle", "--n-train-good", "1", "--n-test-good", "0",
                 "--n-test-per-defect", "1"]) == 0
    assert (tmp_path / "bottle" / "train" / "good" / "000.png").is_file()
    assert (tmp_path / "bottle" / "ground_truth" / "contamination" / "000_mask.png").is_file()


# ---------------------------------------------------------------- the committed copy (assets/demo)
def test_committed_demo_is_small_and_complete():
    assert DEMO.is_dir(), "assets/demo is missing: python -m pipelines.demo_data assets/demo"
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"assets/demo is {total} bytes, over {MAX_BYTES}"
    expected = set()
    for product, damages in PRODUCTS.items():
        expected |= {f"{product}/train/good/{i:03d}.png" for i in range(30)}
        expected |= {f"{product}/test/good/{i:03d}.png" for i in range(8)}
        for d in damages:
            expected |= {f"{product}/test/{d}/{i:03d}.png" for i in range(5)}
            expected |= {f"{product}/ground_truth/{d}/{i:03d}_mask.png" for i in range(5)}
    found = {str(f.relative_to(DEMO)) for f in DEMO.rglob("*") if f.is_file()}
    assert found == expected


def test_committed_demo_matches_the_generator(tmp_path):
    # files have independent rngs, so the first files of a small run equal the defaults' files
    write_demo_dataset(tmp_path, n_train_good=1, n_test_good=1, n_test_per_defect=1)
    fresh = _files(tmp_path)
    assert len(fresh) == 2 * (2 + 2 * 3)
    for name, data in fresh.items():
        committed = DEMO / name
        with Image.open(committed) as a, Image.open(tmp_path / name) as b:
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)), (
                f"{name}: pixels differ — the generator changed; regenerate with "
                "`python -m pipelines.demo_data assets/demo`")
        assert committed.read_bytes() == data, (
            f"{name}: same pixels but other PNG bytes — the PNG encoder (OpenCV/zlib build) changed")
