"""Mask-aware geometric augmentation keeps image and mask aligned and the mask binary."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.augment import AugmentConfig, augment_pair


def _marker_pair(h=128, w=160):
    img = np.full((h, w, 3), 90, np.uint8)
    img[::8] = 100                                   # some texture
    img[50:70, 100:124] = (255, 0, 0)                # a red marker (the "defect")
    mask = np.zeros((h, w), np.uint8)
    mask[50:70, 100:124] = 255
    return img, mask


@pytest.mark.parametrize("seed", range(12))
def test_mask_still_covers_marker(seed):
    img, mask = _marker_pair()
    cfg = AugmentConfig(flip_h=True, flip_v=True, rotate=30, translate=0.1, scale=(0.8, 1.2), crop=0.8, p=1.0)
    a_img, a_mask = augment_pair(img, mask, seed, cfg)
    assert a_img.shape == img.shape and a_mask.shape == mask.shape and a_mask.dtype == np.uint8
    assert set(np.unique(a_mask)) <= {0, 255}
    red = (a_img[..., 0] > 200) & (a_img[..., 1] < 60)
    on = a_mask > 0
    assert on.sum() > 0.25 * (mask > 0).sum()
    # strongly red pixels lie under the mask and the mask's interior is red (bilinear edges aside)
    assert (red & ~on).sum() <= 0.08 * red.sum()
    from pipelines.masks import erode
    inner = erode(a_mask, 2) > 0
    assert (inner & ~red).sum() <= 0.05 * max(1, inner.sum())


def test_seeded_and_geometric_only():
    img, mask = _marker_pair()
    cfg = AugmentConfig(rotate=20, p=1.0)
    a = augment_pair(img, mask, 3, cfg)
    b = augment_pair(img, mask, 3, cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    ident = AugmentConfig(flip_h=False, flip_v=False, p=0.0)
    c = augment_pair(img, mask, 3, ident)
    assert np.array_equal(c[0], img) and np.array_equal(c[1], mask)   # no photometric change
    flip = AugmentConfig(flip_h=True, flip_v=False, p=0.0)
    seen = {augment_pair(img, mask, s, flip)[1][:, :80].any() for s in range(8)}
    assert seen == {True, False}                        # some flipped (marker moved left), some not


def test_config_validation():
    with pytest.raises(ValueError, match="rotate"):
        AugmentConfig(rotate=400)
    with pytest.raises(ValueError, match="unknown augment key.*brightness"):
        AugmentConfig.from_dict({"brightness": 0.1})
