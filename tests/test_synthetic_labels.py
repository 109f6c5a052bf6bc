"""Where a synthetic defect is placed and how it is labelled for the detectors trained on it:
the label is the part of the painted mask the generator visibly changed
(:func:`pipelines.masks.visible_label`), and a type whose reference masks lie on the product's
structure (a bent lead's mask on the lead) gets masks placed on the structure of the base image
(:class:`studio.experiment.MaskSampler` fitted with the reference images)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines.masks import visible_label
from studio.experiment import MaskSampler
from studio.experiment.sources import structure_share

S = 128


def test_the_label_is_the_changed_part_of_the_mask():
    before = np.full((S, S, 3), 100, np.uint8)
    mask = np.zeros((S, S), bool)
    mask[20:100, 20:100] = True
    after = before.copy()
    after[50:56, 30:90] = 210                       # a thin lead moved into a big painted blob
    label = visible_label(before, after, mask)
    assert label[50:56, 30:90].all()                # every changed pixel is labelled
    assert not label[80:100, 20:100].any()          # the untouched board in the blob is not
    assert not (label & ~mask).any()                # never outside the painted mask
    assert 0.05 < label.sum() / mask.sum() < 0.35


def test_a_faint_change_everywhere_keeps_the_painted_mask():
    before = np.full((S, S, 3), 100, np.uint8)
    mask = np.zeros((S, S), bool)
    mask[20:60, 20:60] = True
    after = before.copy()
    after[mask] = 103                               # faint: below the visible threshold
    assert np.array_equal(visible_label(before, after, mask), mask)
    with pytest.raises(ValueError, match="differ in size"):
        visible_label(before, after[:64], mask)


def _product(x: int, rng: np.random.Generator) -> np.ndarray:
    """A copper-coloured board with two bright vertical leads at ``x`` and ``x + 50``."""
    img = np.clip(np.array([150, 90, 70]) + rng.normal(0, 3, (S, S, 3)), 0, 255).astype(np.uint8)
    for xx in (x, x + 50):
        cv2.line(img, (xx, 10), (xx, 118), (225, 225, 230), 5)
    return img


def test_masks_of_a_type_on_the_structure_are_placed_on_the_base_images_structure():
    rng = np.random.default_rng(0)
    refs = []
    for k in range(4):
        img = _product(30 + 3 * k, rng)
        m = np.zeros((S, S), bool)
        m[60:100, 28 + 3 * k:36 + 3 * k] = True     # on the left lead
        refs.append((img, m))
    masks, images = [m for _, m in refs], [i for i, _ in refs]
    plain = MaskSampler.fit("bent_lead", masks, None)
    placed = MaskSampler.fit("bent_lead", masks, None, images)
    assert plain.share is None and placed.share > 0.5
    base = _product(40, np.random.default_rng(9))   # the leads lie 10 px to the right here
    shares_plain = [structure_share(base, plain.sample((S, S), np.random.default_rng(s))) for s in range(12)]
    shares_placed = [structure_share(base, placed.sample((S, S), np.random.default_rng(s), image=base))
                     for s in range(12)]
    assert np.mean(shares_placed) > np.mean(shares_plain) + 0.15, (shares_placed, shares_plain)
    again = placed.sample((S, S), np.random.default_rng(3), image=base)
    assert np.array_equal(again, placed.sample((S, S), np.random.default_rng(3), image=base))
