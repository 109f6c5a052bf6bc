"""Annotate handlers called directly with a context (no server): upload of real photo formats,
paint → generate → accept, mask operations and clear errors."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.config import Settings
from studio.context import StudioContext
from studio.ui import annotate as A

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ctx(tmp_path):
    c = StudioContext(Settings.from_env(workspace=tmp_path / "ws"))
    c.store.import_mvtec(ROOT / "assets" / "demo" / "bottle")
    return c


def _photos(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    out = {}
    Image.fromarray(rgb).save(out.setdefault("png", tmp_path / "a.png"))
    Image.fromarray(rgb).save(out.setdefault("jpeg", tmp_path / "b.jpg"), quality=92)
    Image.fromarray(rgb).save(out.setdefault("tiff", tmp_path / "c.tiff"))
    Image.fromarray(rgb[..., 0]).save(out.setdefault("grey", tmp_path / "d.png"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(out.setdefault("rgba", tmp_path / "e.png"))
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(out.setdefault("16bit", tmp_path / "f.png"))
    return out


def test_upload_every_photo_format_then_generate_and_accept(ctx, tmp_path):
    for kind, path in _photos(tmp_path).items():
        editor, new_id, preview, status = A.on_upload(ctx, str(path), "bottle", 4)
        row = ctx.store.get_image(new_id)
        assert row["product"] == "bottle" and row["split"] == "upload", kind
        assert editor["background"].shape == (120, 160, 3) and "Uploaded" in status
    # paint on the last upload and generate through the handler
    img = ctx.store.load_image(new_id)
    layer = np.zeros((120, 160, 4), np.uint8)
    layer[40:70, 50:90] = (255, 45, 45, 255)
    value = {"background": img, "layers": [layer], "composite": img}
    items, info, first, status = A.on_generate(ctx, value, "bottle", new_id, A.DAMAGE, "contamination", "#000000",
                                               "perlin", 2, 0, 4, 0.8, *A.option_values(),
                                               progress=lambda *a, **k: None)
    assert len(items) == 2 and first == info[0]["sample_id"]
    status, info = A.on_decide(ctx, "accepted", first, "ok", info)
    assert "accepted" in status and ctx.store.get_sample(first)["status"] == "accepted"
    # the upload is a source to paint on: never exported as a train / test image
    root = Path(ctx.store.export_mvtec(tmp_path / "exp", "bottle")["path"])
    assert not (root / "upload").exists() and len(list((root / "synthetic" / "contamination").iterdir())) == 1


def test_bad_upload_and_mask_ops(ctx, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        A.on_upload(ctx, str(tmp_path / "x.png"), "bottle", 4)
    img = np.zeros((64, 64, 3), np.uint8)
    m = np.zeros((64, 64), np.uint8)
    m[20:30, 20:30] = 255
    assert A.apply_mask_op("dilate", img, m, 3, None).sum() > m.sum()
    assert A.apply_mask_op("erode", img, m, 3, None).sum() < m.sum()
    assert A.apply_mask_op("clear", img, m, 3, None).sum() == 0
    assert A.apply_mask_op("random", img, None, 3, "scratch", np.random.default_rng(0)).any()
    with pytest.raises(gr.Error, match="Select a candidate"):
        A.on_decide(ctx, "accepted", 0, "", [])


def test_random_mask_is_shaped_like_the_type(ctx):
    """Random mask follows the product's reference masks of the type (area in their range, on the
    product), not a generic blob."""
    from studio.services import sample_mask, shape_model
    refs = ctx.store.reference_defects("bottle", "broken_small")
    areas = [float((ctx.store.load_mask(r["id"]) > 0).mean()) for r in refs]
    img_id = ctx.store.list_images(product="bottle", split="train")[0]["id"]
    img = ctx.store.load_image(img_id)
    value = {"background": img, "layers": [], "composite": img}
    got = []
    for _ in range(4):
        editor, _preview = A.on_mask_op(ctx, "random", value, img_id, 3, 4, "broken_small", "bottle")
        m = editor["layers"][0][..., 3] > 0
        got.append(m.mean())
    assert all(0.5 * min(areas) <= a <= 2.0 * max(areas) for a in got), (got, areas)
    model, fg = shape_model(ctx.store, "bottle", "broken_small")
    assert fg is not None and fg.shape == img.shape[:2]
    m = sample_mask(ctx.store, "bottle", "broken_small", img.shape[:2], np.random.default_rng(0))
    assert (m > 0).any() and not ((m > 0) & ~fg).any()                      # on the product
    np.testing.assert_array_equal(m, sample_mask(ctx.store, "bottle", "broken_small", img.shape[:2],
                                                 np.random.default_rng(0)))    # seeded


def test_large_photo_shown_resized_kept_full_and_mask_upload(ctx, tmp_path):
    """A 3000×2000 photo is stored at full resolution and shown at DISPLAY_MAX; a mask file of the
    photo's size is taken as the painted mask; the candidate view gives a before / after pair, a
    zoom on the defect region and what the generator learned from."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    editor, new_id, _preview, status = A.on_upload(ctx, str(tmp_path / "big.jpg"), "bottle", 4)
    assert ctx.store.load_image(new_id).shape == (2000, 3000, 3)
    assert max(editor["background"].shape[:2]) == A.DISPLAY_MAX and "shown at" in status
    mask = np.zeros((2000, 3000), np.uint8)
    mask[900:1000, 1400:1600] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    editor, _ = A.on_mask_upload(ctx, str(tmp_path / "mask.png"), editor, new_id, 4)
    image, painted = A.current_image(ctx, editor, new_id)          # display layer → full size
    assert painted.shape == (2000, 3000) and abs(int((painted > 0).sum()) - 20000) < 2000
    items, info, first, _ = A.on_generate(ctx, editor, "bottle", new_id, A.DAMAGE, "broken_small", "#000000",
                                          "cutpaste", 1, 0, 4, 0.8, *A.option_values(),
                                          progress=lambda *a, **k: None)
    n_refs = len(ctx.store.reference_defects("bottle", "broken_small"))
    assert info[0]["learned_from"] == f"cutpaste: copies from {n_refs} reference defect{'s' * (n_refs != 1)} of broken_small"
    (before, after), (zb, za), caption = A.candidate_view(ctx, new_id, first, info)
    assert before.shape == after.shape and max(after.shape[:2]) == A.DISPLAY_MAX
    assert zb.shape == za.shape and max(za.shape[:2]) >= 300 and not np.array_equal(zb, za)
    assert "Candidate 1 of 1" in caption and "copies from" in caption
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(wrong)
    with pytest.raises(gr.Error, match="mask is 10×10 px"):
        A.on_mask_upload(ctx, str(wrong), editor, new_id, 4)
    with pytest.raises(gr.Error, match="Pick a product"):
        A.on_upload(ctx, str(tmp_path / "big.jpg"), "", 4)


def test_next_candidate_prefers_undecided():
    info = [{"sample_id": 5, "status": "accepted"}, {"sample_id": 6, "status": "candidate"},
            {"sample_id": 7, "status": "rejected"}, {"sample_id": 8, "status": "candidate"}]
    assert A.next_candidate(6, info) == 8 and A.next_candidate(8, info) == 6
    assert A.next_candidate(0, info) == 6 and A.next_candidate(0, []) == 0
    box = A.defect_box(np.pad(np.ones((4, 4), bool), 50))
    assert box[1] - box[0] >= 48 and box[0] <= 50 <= box[1]


def test_own_photo_as_a_new_product(ctx, tmp_path):
    """A photo uploaded under a new product name makes that product; any known damage type can be
    painted on it (the product has none of its own yet)."""
    from skimage import data
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg", quality=90)
    editor, new_id, _, status = A.on_upload(ctx, str(tmp_path / "coffee.jpg"), "coffee_cup", 4)
    assert ctx.store.get_image(new_id)["product"] == "coffee_cup" and "coffee_cup" in ctx.store.products()
    assert "scratch" in A.damage_choices(ctx, "coffee_cup")
    layer = np.zeros((*editor["background"].shape[:2], 4), np.uint8)
    layer[150:200, 250:350] = (255, 45, 45, 200)
    value = {"background": editor["background"], "layers": [layer], "composite": editor["background"]}
    items, info, first, _ = A.on_generate(ctx, value, "coffee_cup", new_id, A.DAMAGE, "scratch", "#000000",
                                          "perlin", 1, 0, 4, 0.8, *A.option_values(),
                                          progress=lambda *a, **k: None)
    assert ctx.store.get_sample(first)["product"] == "coffee_cup"
    assert info[0]["learned_from"].startswith("perlin: procedural")


def test_generate_uses_the_mask_the_server_set_when_the_editor_lags(ctx):
    """A mask put in the editor by the server (mask file, mask operation) is used when Generate
    arrives with the editor's layer still empty; a hand-painted layer always wins."""
    img_id = ctx.store.list_images(product="bottle", split="train")[0]["id"]
    img = ctx.store.load_image(img_id)
    stale = {"background": img, "layers": [np.zeros((*img.shape[:2], 4), np.uint8)], "composite": img}
    editor, _preview, layer = A.with_mask_state(lambda *a: A.on_mask_op(ctx, *a))(
        "random", stale, img_id, 3, 4, "broken_small", "bottle")
    assert layer[..., 3].any()
    args = [stale, "bottle", img_id, A.DAMAGE, "broken_small", "#000000", "perlin", 1, 0, 4, 0.8,
            *A.option_values()]
    out = A.ui_generate(ctx, layer, *args, progress=lambda *a, **k: None)
    info = out[1]
    mask = ctx.store.load_sample_mask(info[0]["sample_id"]) > 0
    assert mask.any() and np.array_equal(mask, A.M.mask_from_editor(editor, shape=img.shape[:2]) > 0)
    with pytest.raises(gr.Error, match="empty"):
        A.ui_generate(ctx, None, *args, progress=lambda *a, **k: None)


def test_a_nan_seed_reaches_the_handler_and_is_refused_naming_the_seed(ctx):
    """The seed widget passes what an API call sent (no rounding that fails on NaN first), and
    the handler's answer names the field."""
    import math
    with gr.Blocks() as demo:
        A.build(ctx)
    seed = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "seed")
    for sent in (float("nan"), 2.5, -5, 1e30):
        got = seed.preprocess(sent)
        assert (math.isnan(got) if sent != sent else got == sent)
    img_id = ctx.store.list_images(product="bottle", split="train")[0]["id"]
    img = ctx.store.load_image(img_id)
    layer = np.zeros((*img.shape[:2], 4), np.uint8)
    layer[40:80, 40:90] = (255, 45, 45, 255)
    value = {"background": img, "layers": [layer], "composite": img}
    for bad in (float("nan"), 2.5, -5):
        with pytest.raises(gr.Error, match="seed must be an integer"):
            A.on_generate(ctx, value, "bottle", img_id, A.DAMAGE, "contamination", "#000000", "perlin", 1,
                          seed.preprocess(bad), 4, 0.8, *A.option_values(), progress=lambda *a, **k: None)
    items, info, first, _ = A.on_generate(ctx, value, "bottle", img_id, A.DAMAGE, "contamination", "#000000",
                                          "perlin", 1, seed.preprocess(7.0), 4, 0.8, *A.option_values(),
                                          progress=lambda *a, **k: None)
    assert info[0]["seed"] == 7 and ctx.store.get_sample(first)["seed"] == 7
