"""The supervised segmenter: it learns a clearly separable pasted defect, an untrained one is at
chance, training is deterministic, shapes are as documented."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import metrics as MET
from pipelines.backbones import build_backbone
from pipelines.segmenter import (DefectSegmenter, FeatureCache, TrainConfig, masks_to_grid, predict_maps,
                                 stack_features, train_segmenter)

SIZE = 128


def _toy(n_good: int, n_defect: int, seed: int):
    """Grey noise texture; a defect = a bright 24×24 square pasted at a random place."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n_good + n_defect):
        img = np.clip(rng.normal(110, 18, (SIZE, SIZE, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
        m = np.zeros((SIZE, SIZE), bool)
        if i >= n_good:
            y, x = rng.integers(8, SIZE - 32, 2)
            m[y:y + 24, x:x + 24] = True
            img[m] = (235, 225, 60)
        images.append(img)
        masks.append(m)
    return images, np.stack(masks)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one torch thread is faster than two, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(one_thread):
    cache = FeatureCache(build_backbone("random"))
    tr_img, tr_m = _toy(16, 16, 0)
    te_img, te_m = _toy(8, 8, 1)
    return cache, cache.features(tr_img), tr_m, cache.features(te_img), te_m


def test_trained_segmenter_finds_the_pasted_defect_and_untrained_is_at_chance(toy):
    cache, f_train, m_train, f_test, m_test = toy
    labels = m_test.reshape(len(m_test), -1).any(1)
    model = train_segmenter(f_train, list(m_train), TrainConfig(steps=120, seed=0))
    scores, maps = predict_maps(model, f_test, SIZE)
    assert maps.shape == (len(m_test), SIZE, SIZE) and scores.shape == (len(m_test),)
    assert np.allclose(scores, maps.reshape(len(maps), -1).max(1))
    assert MET.pixel_auroc(m_test, maps) > 0.95
    assert MET.image_auroc(labels, scores) > 0.85
    # inside the defect the probability is far higher than on the texture
    assert maps[m_test].mean() > 5 * maps[~m_test].mean()

    untrained = train_segmenter(f_train, list(m_train), TrainConfig(steps=0, seed=0))
    s0, maps0 = predict_maps(untrained, f_test, SIZE)
    assert abs(MET.pixel_auroc(m_test, maps0) - 0.5) < 0.05
    assert abs(MET.image_auroc(labels, s0) - 0.5) < 0.1


def test_training_is_deterministic_in_its_seed(toy):
    _, f_train, m_train, f_test, _ = toy
    a = predict_maps(train_segmenter(f_train, list(m_train), TrainConfig(steps=15, seed=3)), f_test, SIZE)[1]
    b = predict_maps(train_segmenter(f_train, list(m_train), TrainConfig(steps=15, seed=3)), f_test, SIZE)[1]
    c = predict_maps(train_segmenter(f_train, list(m_train), TrainConfig(steps=15, seed=4)), f_test, SIZE)[1]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shapes_and_feature_stacking():
    maps = [torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)]
    x = stack_features(maps)
    assert x.shape == (2, 12, 8, 8)
    model = DefectSegmenter([5, 7])
    assert model(maps).shape == model(x).shape == (2, 1, 8, 8)
    # the zero-initialised output layer: an untrained model gives one constant (the prior)
    out = torch.sigmoid(model(x))
    assert torch.allclose(out, torch.full_like(out, 0.02), atol=1e-6)
    grid = masks_to_grid([np.pad(np.ones((4, 4)), ((0, 12), (0, 12)))], (4, 4))
    assert grid.shape == (1, 1, 4, 4) and float(grid[0, 0, 0, 0]) == 1.0 and float(grid.sum()) == 1.0
    with pytest.raises(ValueError, match="masks"):
        train_segmenter(x, [np.zeros((32, 32))], TrainConfig(steps=1))


def test_synthetic_defects_come_on_top_of_the_real_batches(toy):
    """Samples marked ``extra`` (synthetic defects added to real ones) never change the real
    batches: with no extra draws per batch the weights equal a training without them; with the
    default draws they change the model; synthetic only (no real defect) trains on them."""
    _, f_train, m_train, _, _ = toy
    cfg = TrainConfig(steps=30, seed=3)
    real_f, real_m = f_train[:24], list(m_train[:24])          # 16 good + 8 real defects
    syn_f, syn_m = f_train[24:], list(m_train[24:])            # 8 "synthetic" defects
    both_f, both_m = torch.cat([real_f, syn_f]), real_m + syn_m
    flags = [False] * 24 + [True] * 8
    ref = train_segmenter(real_f, real_m, cfg)
    none_drawn = train_segmenter(both_f, both_m, TrainConfig(steps=30, seed=3, extra_per_batch=0), extra=flags)
    added = train_segmenter(both_f, both_m, cfg, extra=flags)
    same = [torch.equal(a, b) for a, b in zip(ref.state_dict().values(), none_drawn.state_dict().values())]
    assert all(same)
    assert not torch.equal(ref.out.weight, added.out.weight)
    syn_only = train_segmenter(torch.cat([f_train[:16], syn_f]), list(m_train[:16]) + syn_m, cfg,
                               extra=[False] * 16 + [True] * 8)
    assert syn_only.out.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="extra flags"):
        train_segmenter(both_f, both_m, cfg, extra=flags[:-1])
