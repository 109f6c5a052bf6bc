"""KID-style quality: correct normalisation, ≈ 0 for one distribution, > 0 for shifted ones, and the
"real" side is the product's real reference defects only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.backbones import build_backbone
from pipelines.quality import crop_features, diversity, kid

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"


def test_kid_zero_for_one_distribution_positive_for_shifted():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 1.0, (1, 64))
    a = base + rng.normal(0, 0.5, (200, 64))
    b = base + rng.normal(0, 0.5, (200, 64))
    c = base + 1.5 * rng.normal(0, 1, (1, 64)) + rng.normal(0, 0.5, (200, 64))
    same, shifted = kid(a, b), kid(a, c)
    assert abs(same) < 0.1 * shifted and shifted > 0
    with pytest.raises(ValueError, match="at least 2"):
        kid(a[:1], b)
    assert diversity(a) > 0 and diversity(np.repeat(a[:1], 5, 0)) == pytest.approx(0, abs=1e-9)


def test_crop_features_feed_the_extractor_once_normalised():
    torch.manual_seed(0)
    ext = build_backbone("random").eval()
    crops = [np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8) for i in range(3)]
    got = crop_features(ext, crops)
    x = torch.from_numpy(np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    with torch.inference_mode():
        want = torch.cat([f.mean(dim=(2, 3)) for f in ext(x)], 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # [0, 1] in; the extractor normalises


def test_kid_on_real_crops_separates_textures():
    """Crops of one texture vs crops of the same texture vs a shifted (recoloured) texture."""
    from skimage import data
    ext = build_backbone("efficientnet_lite0").eval()
    brick = data.brick()
    rng = np.random.default_rng(1)
    def crops(img, n):
        out = []
        for _ in range(n):
            y, x = rng.integers(0, img.shape[0] - 96, 2)
            c = img[y:y + 96, x:x + 96]
            out.append(np.repeat(c[..., None], 3, 2) if c.ndim == 2 else c)
        return out
    a, b = crop_features(ext, crops(brick, 24)), crop_features(ext, crops(brick, 24))
    grass = data.grass()
    g = crop_features(ext, crops(grass, 24))
    assert kid(a, g) > 0 and abs(kid(a, b)) < 0.25 * kid(a, g)


def test_quality_real_side_is_reference_real_only(tmp_path):
    from studio.curation import quality
    from studio.dataset import Store
    store = Store(tmp_path / "ws")
    store.import_mvtec(BOTTLE)
    ref = store.reference_defects("bottle", "contamination")
    # a synthetic image stored in the product with the same label must not count as real
    img = store.load_image(ref[0]["id"])
    store.add_image("bottle", np.flipud(img).copy(), split="test", label="contamination", origin="synthetic",
                    mask=np.flipud(store.load_mask(ref[0]["id"])).copy())
    row = next(r for r in quality(store, "bottle") if r["label"] == "contamination")
    assert row["real"] == len(ref) == 2
    store.close()
