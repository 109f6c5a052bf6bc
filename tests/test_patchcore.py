"""PatchCore property tests (patchcore-inspection style): training images score ~0, heatmaps have
the input's shape, save → load gives identical scores, the dual bank with an empty positive bank
equals the single bank; plus the issue's bar on the demo data (image AUROC ≥ 0.99, pixel ≥ 0.97)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines import metrics as MET
from pipelines.mvtec import LayoutError, load_category, load_image, load_mask
from pipelines.patchcore import (Cancelled, NearestNeighbours, NotFittedError, PatchCore, PatchEmbedder,
                                 cdist_knn, default_embed_dim, greedy_coreset, greedy_coreset_reference, split_positives)
from tests.conftest import DEMO

SIZE = 256


def _data(product: str):
    cat = load_category(DEMO / product)
    train = [load_image(p, SIZE) for p in cat.train]
    test = [load_image(s.path, SIZE) for s in cat.test]
    masks = np.stack([load_mask(s, SIZE) for s in cat.test])
    labels = np.array([s.is_anomaly for s in cat.test], int)
    return cat, train, test, masks, labels


@pytest.fixture(scope="module")
def bottle():
    return _data("bottle")


@pytest.fixture(scope="module")
def fitted(bottle):
    _, train, *_ = bottle
    return PatchCore(coreset=0.1).fit(train[:10])


@pytest.mark.parametrize("product", ["bottle", "brushed_metal"])
def test_demo_auroc_with_offline_backbone(product):
    _, train, test, masks, labels = _data(product)
    model = PatchCore(backbone="efficientnet_lite0", coreset=0.1).fit(train)
    scores, maps = model.predict(test)
    res = MET.evaluate(labels, scores, masks, maps)
    assert res["image_auroc"] >= 0.99, res
    assert res["pixel_auroc"] >= 0.97, res


def test_training_images_score_near_zero(bottle):
    _, train, test, _, labels = bottle
    model = PatchCore(coreset=1.0).fit(train[:3])
    train_scores, train_maps = model.predict(train[:3])
    defect_scores, _ = model.predict([t for t, y in zip(test, labels) if y][:5])
    assert train_scores.max() < 1e-2 * defect_scores.min(), (train_scores, defect_scores)
    assert train_maps.max() < 1e-2 * defect_scores.min()


def test_coreset_bank_scores_train_far_below_defects(fitted, bottle):
    _, train, test, _, labels = bottle
    assert fitted.bank_size == int(np.ceil(0.1 * 10 * 32 * 32))
    s_train, _ = fitted.predict(train[:10])
    s_test, _ = fitted.predict(test)
    assert s_train.max() < s_test[labels == 1].min()


def test_heatmap_shape_equals_input_and_mixed_sizes_are_resized(fitted, bottle):
    _, _, test, _, _ = bottle
    scores, maps = fitted.predict(test[:3])
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    import cv2
    mixed = [test[0], cv2.resize(test[1], (300, 200)), test[2][:, :, 0]]   # other size, greyscale
    s2, per_input = fitted.predict(mixed, original_size=True)
    assert [m.shape for m in per_input] == [(SIZE, SIZE), (200, 300), (SIZE, SIZE)]
    assert np.isclose(s2[0], scores[0])


def test_save_load_gives_identical_scores(fitted, bottle, tmp_path):
    _, _, test, _, _ = bottle
    fitted.save(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "banks.safetensors"}
    loaded = PatchCore.load(tmp_path / "model")
    a, ma = fitted.predict(test[:6])
    b, mb = loaded.predict(test[:6])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    with pytest.raises(ValueError, match="not a saved PatchCore"):
        PatchCore.load(tmp_path)
    # a model saved with an unresolved dim (older format) takes the bank's width
    cfg_path = tmp_path / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["dim"] == fitted.dim_out
    cfg_path.write_text(json.dumps({**cfg, "dim": None}))
    assert PatchCore.load(tmp_path / "model").dim_out == fitted.dim_out


def test_dual_bank_empty_positive_bank_equals_single(fitted, bottle):
    _, _, test, _, labels = bottle
    sub = [t for t, y in zip(test, labels) if y][:3] + [t for t, y in zip(test, labels) if not y][:3]
    single_s, single_m = fitted.predict(sub)
    for rule in ("margin", "ratio"):
        fitted.config["dual_rule"] = rule
        fitted.fit_positive([], [])
        s, m = fitted.predict(sub)
        np.testing.assert_array_equal(s, single_s)
        np.testing.assert_array_equal(m, single_m)
    fitted.fit_positive(sub[:2], [np.zeros((SIZE, SIZE), bool)] * 2)   # masks without defects
    assert fitted.positive_bank_size == 0
    np.testing.assert_array_equal(fitted.predict(sub)[0], single_s)
    fitted.config["dual_rule"] = "margin"


def test_dual_bank_raises_maps_only_and_keeps_auroc(fitted, bottle):
    cat = bottle[0]
    bank_samples, eval_samples = split_positives(cat, fraction=0.3, seed=0)
    pos_imgs = [load_image(s.path, SIZE) for s in bank_samples]
    pos_masks = [load_mask(s, SIZE) for s in bank_samples]
    ev = [load_image(s.path, SIZE) for s in eval_samples]
    ev_labels = np.array([s.is_anomaly for s in eval_samples], int)
    s1, m1 = fitted.predict(ev)
    try:
        fitted.fit_positive(pos_imgs, pos_masks)
        assert fitted.positive_bank_size > 0
        s2, m2 = fitted.predict(ev)
    finally:
        fitted.fit_positive([], [])
    assert (m2 >= m1 - 1e-5).all()          # s ≥ d_n, and upsampling/blur are positive operators
    assert MET.image_auroc(ev_labels, s2) >= MET.image_auroc(ev_labels, s1) - 1e-9


def test_split_positives_is_deterministic_and_disjoint(bottle):
    cat = bottle[0]
    bank, ev = split_positives(cat, fraction=0.3, seed=0)
    bank2, ev2 = split_positives(cat, fraction=0.3, seed=0)
    assert [s.path for s in bank] == [s.path for s in bank2] and [s.path for s in ev] == [s.path for s in ev2]
    assert not {s.path for s in bank} & {s.path for s in ev}
    assert len(bank) + len(ev) == len(cat.test)
    assert all(s.is_anomaly for s in bank)
    assert sum(not s.is_anomaly for s in ev) == sum(not s.is_anomaly for s in cat.test)
    for t in cat.defect_types:           # 5 per type → round(1.5) = 2 held out, 3 evaluated
        assert sum(s.label == t for s in bank) == 2
    other, _ = split_positives(cat, fraction=0.3, seed=1)
    assert {s.path for s in other} != {s.path for s in bank}


def test_bad_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    model = PatchCore(backbone="random")
    with pytest.raises(LayoutError, match="train/good"):
        model.fit_folder(tmp_path)
    with pytest.raises(NotFittedError):
        model.predict([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="list of images"):
        model.fit(np.zeros((64, 64, 3), np.uint8))


def test_progress_and_cancel(bottle):
    _, train, *_ = bottle
    seen = []
    PatchCore(backbone="random", size=64).fit(train[:4], progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        PatchCore(backbone="random", size=64).fit(train[:4], cancelled=lambda: True)


def test_greedy_coreset_picks_one_point_per_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=g) * 10
    pts = torch.cat([c + 0.01 * torch.randn(50, 32, generator=g) for c in centres])
    idx = greedy_coreset(pts, 6, projection_dim=16, seed=3)
    assert sorted((idx // 50).tolist()) == list(range(6))
    assert len(set(greedy_coreset(pts, 40).tolist())) == 40
    # the triangle-inequality pruning selects exactly what the plain greedy loop selects
    x = torch.randn(4000, 152, generator=g) * torch.rand(1, 152, generator=g)
    assert torch.equal(greedy_coreset(x, 400, seed=5), greedy_coreset_reference(x, 400, seed=5))


def test_knn_backends_agree():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(500, 48, generator=g), torch.randn(300, 48, generator=g)
    d_ref, i_ref = cdist_knn(q, bank, k=3)
    for method in ("auto", "faiss", "torch"):
        nn_ = NearestNeighbours(bank, method, chunk=128)
        d, i = nn_.search(q, 3)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-4)
        # the values-only path used for patch scores (ragged last chunk: 300 = 2·128 + 44)
        torch.testing.assert_close(nn_.nearest_distance(q), d_ref[:, 0], rtol=1e-4, atol=1e-4)
    ivf = NearestNeighbours(bank, "auto", ivf_threshold=100)     # large-bank path: faiss IVF
    assert ivf.method == "faiss" and "IVF" in type(ivf.index).__name__
    _, i = ivf.search(q, 1)
    assert (i[:, 0] == i_ref[:, 0]).float().mean() > 0.75     # approximate by design
    d, i = NearestNeighbours(torch.empty(0, 48)).search(q, 1)
    assert torch.isinf(d).all() and (i == -1).all()
    assert torch.isinf(NearestNeighbours(torch.empty(0, 48)).nearest_distance(q)).all()


def test_embedder_pools_channels_per_layer():
    emb = PatchEmbedder([40, 112], dim=128)
    out = emb([torch.rand(2, 40, 32, 32), torch.rand(2, 112, 16, 16)])
    assert out.shape == (2, 32, 32, 128) and emb.dims == (64, 64)
    assert PatchEmbedder([40, 112], dim=80).dims == (40, 40)     # the pre-issue-11 default
    assert PatchEmbedder([40, 112], dim=None).out_dim == 152    # default: every channel
    assert PatchEmbedder([40, 112], dim=None).dims == (40, 112)
    assert default_embed_dim([40, 112]) == 152 and default_embed_dim([128, 256]) == 384
    assert default_embed_dim([512, 1024]) == 1024 and default_embed_dim([1024, 2048]) == 1024
    assert PatchEmbedder([512, 1024]).dims == (512, 512)         # WideResNet-50: pooled, as in the paper


def test_embedder_default_is_the_plain_patchcore_embedding():
    """All channels, zero-padded 3×3 mean (AvgPool2d(3, 1, 1), as anomalib / the paper's
    zero-padded unfold), the coarse map bilinearly upsampled, concatenated."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    f0, f1 = torch.rand(2, 40, 32, 32, generator=g), torch.rand(2, 112, 16, 16, generator=g)
    ref = torch.cat([F.avg_pool2d(f0, 3, 1, 1),
                     F.interpolate(F.avg_pool2d(f1, 3, 1, 1), size=(32, 32), mode="bilinear",
                                   align_corners=False)], 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(PatchEmbedder([40, 112])([f0, f1]), ref)


def test_embedder_border_cells_shrink_towards_zero():
    """Regression (issue 11): averaging the border cells over in-image cells only
    (count_include_pad=False) let the noisy border features of a zero-padded CNN dominate the
    good images' scores on real data (transistor image AUROC 0.91 vs 1.00). With the zeros
    counted, a constant map keeps its value inside and shrinks by 6/9 on edges, 4/9 in corners."""
    ones = [torch.ones(1, 2, 8, 8)]
    out = PatchEmbedder([2])(ones)[0, ..., 0]
    assert torch.allclose(out[1:-1, 1:-1], torch.ones(6, 6))
    assert torch.allclose(out[0, 1:-1], torch.full((6,), 6 / 9)) and torch.allclose(out[1:-1, -1], torch.full((6,), 6 / 9))
    assert torch.allclose(out[[0, 0, -1, -1], [0, -1, 0, -1]], torch.full((4,), 4 / 9))
    assert torch.equal(PatchEmbedder([2], count_include_pad=False)(ones), torch.ones(1, 8, 8, 2))


def test_defaults_and_legacy_config(fitted, bottle, tmp_path):
    _, _, test, _, _ = bottle
    cfg = fitted.config
    assert (cfg["dim"], cfg["normalization"], cfg["count_include_pad"], cfg["image_score"]) == \
        (152, "tf", True, "reweight")
    assert fitted.extractor.normalization == "tf"
    assert torch.equal(fitted.extractor.mean, torch.full((1, 3, 1, 1), 0.5))
    assert PatchCore(backbone="random").config["normalization"] == "imagenet"
    assert PatchCore(backbone="random").config["coreset"] == 0.05
    # a model saved before these settings existed is rebuilt with what it was computed with
    fitted.save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("normalization", "count_include_pad", "image_score")}
    path.write_text(json.dumps(old))
    legacy = PatchCore.load(tmp_path / "m")
    assert (legacy.config["normalization"], legacy.config["count_include_pad"], legacy.config["image_score"]) == \
        ("imagenet", False, "reweight")
    assert legacy.extractor.normalization == "imagenet" and not legacy.embedder.count_include_pad
    with pytest.raises(ValueError, match="image_score"):
        PatchCore(backbone="random", image_score="mean")
    with pytest.raises(ValueError, match="normalization"):
        PatchCore(backbone="random", normalization="caffe")


def test_image_score_max_is_the_map_maximum(fitted, bottle):
    _, _, test, _, _ = bottle
    try:
        fitted.config["image_score"] = "max"
        scores, maps = fitted.predict(test[:5])
    finally:
        fitted.config["image_score"] = "reweight"
    np.testing.assert_array_equal(scores, maps.reshape(5, -1).max(1))
    reweighted, maps2 = fitted.predict(test[:5])
    np.testing.assert_array_equal(maps, maps2)
    assert not np.array_equal(reweighted, scores)      # the paper's rule: another number


def test_pipelines_never_import_gradio_or_studio():
    code = ("import sys, pipelines.patchcore, pipelines.backbones; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('gradio', 'studio')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(DEMO.parent.parent))


def test_channel_pooling_matrix_equals_adaptive_avg_pool():
    import torch.nn.functional as F
    from pipelines.patchcore import adaptive_pool_matrix
    x = torch.randn(20, 112)
    for d in (76, 64, 200):
        torch.testing.assert_close(x @ adaptive_pool_matrix(112, d), F.adaptive_avg_pool1d(x[:, None], d)[:, 0])


def test_positive_coreset_keeps_a_cell_of_every_defect_image(fitted, bottle):
    """Three small defects (one feature cell each) at the default 10 % coreset: the bank keeps one
    cell per defect image, not ceil(10 % of 3) = 1 for all of them."""
    _, _, test, _, _ = bottle
    imgs = test[:3]
    masks = []
    for i in range(3):
        m = np.zeros((SIZE, SIZE), bool)
        m[10 + 20 * i:14 + 20 * i, 10:14] = True       # one small spot each, apart
        masks.append(m)
    try:
        fitted.fit_positive(imgs, masks)
        assert fitted.positive_bank_size >= 3
        fitted.fit_positive(imgs[:1], masks[:1])
        assert fitted.positive_bank_size >= 1
    finally:
        fitted.fit_positive([], [])
