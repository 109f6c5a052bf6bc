"""Annotate: the backend info and the Backend dropdown's marks follow the current product (and the
workspace's trained runs); Generate with a backend that has no model for the product is a toast
with the fix; the defect zoom is the defect's neighbourhood, magnified."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.config import Settings
from studio.context import StudioContext
from studio.ui import annotate as A

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "assets" / "models" / "bottle" / "pixel-inpaint"


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECT_STUDIO_PIXEL_INPAINT", raising=False)
    c = StudioContext(Settings.from_env(workspace=tmp_path / "ws"))
    c.store.import_mvtec(ROOT / "assets" / "demo" / "bottle")
    return c


def _upload(ctx, tmp_path, product: str) -> int:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "own.png")
    return A.on_upload(ctx, str(tmp_path / "own.png"), product, 4)[1]


def _marks(update) -> dict:
    return {value: label for label, value in update["choices"]}


def test_info_and_marks_follow_the_product(ctx, tmp_path):
    # a product with a shipped model: ready, for that product (not "for bottle, brushed_metal")
    info = A.on_backend(ctx, "pixel-inpaint", "bottle", None)[0]
    assert "ready for **bottle**" in info and "brushed_metal" not in info
    text, dropdown = A.on_context(ctx, "pixel-inpaint", "bottle", None)
    assert text == info and _marks(dropdown)["pixel-inpaint"] == "pixel-inpaint"

    # an uploaded photo of a new product: no model, said plainly, with how to get one
    new_id = _upload(ctx, tmp_path, "coffee_cup")
    text, dropdown = A.on_context(ctx, "pixel-inpaint", "coffee_cup", new_id)
    assert "ready" not in text
    assert "No pixel-inpaint model for product 'coffee_cup'" in text
    assert "Training tab" in text and "python -m studio train --kind pixel-inpaint" in text
    assert "15 min" in text and str(ctx.settings.workspace / "adapters") in text
    assert "perlin" in text                                        # what runs meanwhile
    assert _marks(dropdown)["pixel-inpaint"] == "pixel-inpaint — no model for coffee_cup"
    assert _marks(dropdown)["perlin"] == "perlin" and "auto" in _marks(dropdown)
    assert A.on_backend(ctx, "pixel-inpaint", "coffee_cup", new_id)[0] == text
    # the Product box empty: the source image's product
    assert A.on_context(ctx, "pixel-inpaint", "", new_id)[0] == text
    # a backend without models per product is unchanged by the product
    assert "ready" in A.on_context(ctx, "perlin", "coffee_cup", new_id)[0]


def test_a_trained_run_in_the_workspace_makes_the_product_ready(ctx, tmp_path):
    ws = ctx.settings.workspace
    assert "No pixel-inpaint model" in A.on_context(ctx, "pixel-inpaint", "coffee_cup", None)[0]
    run = ws / "adapters" / "pixel-inpaint-coffee_cup"          # what the Training tab writes
    ck = run / "checkpoints" / "step-0000010"
    ck.mkdir(parents=True)
    shutil.copy(SHIPPED / "model.safetensors", ck / "model.safetensors")
    shutil.copy(SHIPPED / "config.json", ck / "config.json")
    (ck / "trainer_state.json").write_text(json.dumps({"kind": "pixel-inpaint", "step": 10}))
    (run / "latest").write_text(ck.name)
    (run / "training_data.json").write_text(json.dumps({"data": str(ws / "exports" / "x" / "coffee_cup")}))
    text, dropdown = A.on_context(ctx, "pixel-inpaint", "coffee_cup", None)
    assert "ready for **coffee_cup**" in text and str(run) in text
    assert _marks(dropdown)["pixel-inpaint"] == "pixel-inpaint"


def test_generate_without_a_model_for_the_product_is_a_toast_with_the_fix(ctx, tmp_path):
    new_id = _upload(ctx, tmp_path, "coffee_cup")
    img = ctx.store.load_image(new_id)
    layer = np.zeros((*img.shape[:2], 4), np.uint8)
    layer[30:50, 40:70] = (255, 45, 45, 255)
    value = {"background": img, "layers": [layer], "composite": img}
    args = [value, "coffee_cup", new_id, A.DAMAGE, "scratch", "#000000", "pixel-inpaint", 1, 0, 4, 0.8,
            *A.option_values()]
    with pytest.raises(gr.Error) as err:
        A.ui_generate(ctx, None, *args, progress=lambda *a, **k: None)
    msg = err.value.message
    assert "No pixel-inpaint model for product 'coffee_cup'" in msg and "Training tab" in msg
    assert "python -m studio train --kind pixel-inpaint" in msg
    # the same photo with a backend that needs no model generates
    args[6] = "perlin"
    out = A.ui_generate(ctx, None, *args, progress=lambda *a, **k: None)
    assert len(out[1]) == 1


def test_the_tab_wires_product_and_source_changes_to_the_info(ctx):
    with gr.Blocks() as demo:
        A.build(ctx)
    fns = [getattr(d.fn, "func", d.fn) for d in demo.fns.values()]
    assert fns.count(A.on_context) == 2 and A.on_backend in fns
    ctx_deps = [d for d in demo.fns.values() if getattr(d.fn, "func", None) is A.on_context]
    info = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "backend-info")
    backend = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "backend")
    for d in ctx_deps:
        assert [o._id for o in d.outputs] == [info._id, backend._id]
    assert dict((v, k) for k, v in backend.choices)["auto"] == "auto"


# -- the defect zoom --------------------------------------------------------------------------
def _inside(box, mask) -> bool:
    ys, xs = np.nonzero(mask)
    return box[0] <= ys.min() and ys.max() < box[1] and box[2] <= xs.min() and xs.max() < box[3]


def test_zoom_box_of_a_small_defect_is_small_and_holds_it():
    for y, x in ((120, 120), (0, 0), (246, 246), (5, 200)):        # centre, corners, an edge
        mask = np.zeros((256, 256), bool)
        mask[y:y + 10, x:x + 10] = True
        box = A.defect_box(mask)
        h, w = box[1] - box[0], box[3] - box[2]
        assert _inside(box, mask), (y, x, box)
        assert 0 <= box[0] and box[1] <= 256 and 0 <= box[2] and box[3] <= 256
        assert 40 <= h <= 80 and 40 <= w <= 80, box                # ≤ a third of the image side
        assert max(h, w) <= 2 * min(h, w)                          # square-ish


def test_zoom_box_of_a_medium_defect_keeps_a_modest_margin():
    mask = np.zeros((256, 256), bool)
    mask[90:150, 100:170] = True                                    # 60 × 70 px
    box = A.defect_box(mask)
    assert _inside(box, mask)
    assert 70 < box[1] - box[0] < 150 and 80 < box[3] - box[2] < 150   # not the whole image
    thin = np.zeros((256, 256), bool)
    thin[120:124, 20:220] = True                                    # a long thin scratch
    box = A.defect_box(thin)
    assert _inside(box, thin) and box[1] - box[0] >= (box[3] - box[2]) // 2


def test_zoom_box_of_a_large_defect_is_nearly_the_image():
    mask = np.zeros((256, 256), bool)
    mask[10:240, 20:250] = True
    box = A.defect_box(mask)
    assert box[1] - box[0] >= 240 and box[3] - box[2] >= 240 and _inside(box, mask)
    assert A.defect_box(np.zeros((256, 300), bool)) == (0, 256, 0, 300)


def test_zoom_is_upscaled_to_zoom_size_pixel_exact():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[120:130, 120:130] = True
    box = A.defect_box(mask)
    out = A.zoom(img, box)
    crop = img[box[0]:box[1], box[2]:box[3]]
    assert max(out.shape[:2]) == A.ZOOM_SIZE and out.shape[2] == 3
    assert abs(out.shape[0] / out.shape[1] - crop.shape[0] / crop.shape[1]) < 0.05
    # nearest neighbour: every zoomed pixel is a pixel of the crop, the corners are the crop's
    assert np.array_equal(out[0, 0], crop[0, 0]) and np.array_equal(out[-1, -1], crop[-1, -1])
    assert set(map(tuple, out.reshape(-1, 3))) <= set(map(tuple, crop.reshape(-1, 3)))
    big = A.zoom(rng.integers(0, 255, (1000, 800, 3), dtype=np.uint8), (0, 1000, 0, 800))
    assert big.shape[:2] == (A.ZOOM_SIZE, round(800 * A.ZOOM_SIZE / 1000))


def test_candidate_view_zooms_on_a_small_painted_defect(ctx):
    img_id = ctx.store.list_images(product="bottle", split="train")[0]["id"]
    img = ctx.store.load_image(img_id)
    layer = np.zeros((*img.shape[:2], 4), np.uint8)
    layer[100:110, 120:130] = (255, 45, 45, 255)
    value = {"background": img, "layers": [layer], "composite": img}
    out = A.ui_generate(ctx, None, value, "bottle", img_id, A.DAMAGE, "contamination", "#000000", "perlin",
                        1, 0, 4, 0.8, *A.option_values(), progress=lambda *a, **k: None)
    (before, after), (zb, za), caption = out[6], out[7], out[8]
    assert before.shape == img.shape and zb.shape == za.shape and max(za.shape[:2]) == A.ZOOM_SIZE
    assert "48×48 px, ×8.0" in caption
    assert not np.array_equal(zb, za)                              # the defect shows in the zoom


def test_backend_status_endpoint_takes_the_product(ctx):
    """What an API client (and the page) gets from /backend_status for a product."""
    from gradio_client import Client
    with gr.Blocks() as demo:
        A.build(ctx)
    demo.queue().launch(prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        info = client.predict("pixel-inpaint", "coffee_cup", api_name="/backend_status")[0]
        assert "No pixel-inpaint model for product 'coffee_cup'" in info and "Training tab" in info
        assert "ready for **bottle**" in client.predict("pixel-inpaint", "bottle", api_name="/backend_status")[0]
    finally:
        demo.close()
