"""A thin crack painted in the browser comes out as a thin crack along the whole stroke (issue 22).

Debian's Chromium driven by Playwright on the studio (the shared fresh-workspace server): the bundled
brushed_metal product, one of its train/good photos, a diagonal stroke painted with the mouse in
the Annotate tab with the smallest brush (radius 2) and eroded by 1 px with the tab's Erode button
(a 3 px stroke), damage type ``crack``, backend ``stroke``, two candidates. The
candidates are read back from the workspace's store (as the sample files the app wrote): their
changed pixels lie within the painted mask dilated by the feather radius and cover ≥ 60 % of its
skeleton.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import CHROMIUM, studio_page

pytestmark = pytest.mark.browser
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def _choose(pg, elem: str, text: str) -> None:
    pg.click(f"{elem} input")
    pg.locator("ul[role=listbox] li").filter(has_text=text).first.click()


def _status_has(pg, text: str, timeout: float = 60_000) -> None:
    pg.wait_for_function(f"document.querySelector('#annotate-status').innerText.includes({text!r})",
                         timeout=timeout)


def _set_number(pg, elem: str, value) -> None:
    box = pg.locator(f"{elem} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_thin_painted_crack_gives_a_thin_crack_along_the_stroke(studio_server, tmp_path):
    from PIL import Image
    from skimage.morphology import skeletonize

    from pipelines import masks as mk
    from studio.dataset import Store
    url, ws = studio_server
    with studio_page(url, height=1200) as pg:
        _choose(pg, "#product", "brushed_metal")
        pg.wait_for_timeout(500)
        _choose(pg, "#image-pick", "train/good")
        _status_has(pg, "Loaded image #")
        pg.wait_for_timeout(1000)
        _set_number(pg, "#brush-size", 2)       # gradio's brush size is a radius: a ~5 px line
        pg.wait_for_timeout(1000)

        box = pg.locator("#editor canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        d = 0.3 * min(box["width"], box["height"])
        pg.mouse.move(cx - d, cy + 0.7 * d)
        pg.mouse.down()
        for i in range(1, 25):
            f = i / 24
            pg.mouse.move(cx - d + 2 * d * f, cy + 0.7 * d - 1.4 * d * f, steps=2)
        pg.mouse.up()
        pg.wait_for_timeout(1000)
        _set_number(pg, "#mask-px", 1)           # ... eroded by 1 px: the 3 px stroke
        pg.wait_for_timeout(500)
        pg.click("#mask-erode")
        pg.wait_for_timeout(1500)

        _choose(pg, "#damage", "crack")
        _choose(pg, "#backend", "stroke")
        _set_number(pg, "#n", 2)
        feather = int(float(pg.locator("#feather input[type=number]").input_value()))
        pg.click("#generate")
        _status_has(pg, "2 candidate", timeout=120_000)
        pg.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item').length == 2")
        caption = pg.inner_text("#candidate-caption")
        assert "Candidate 1 of 2" in caption and "stroke" in caption
        pg.screenshot(path=str(tmp_path / "stroke.png"), full_page=True)

    store = Store(ws)
    try:
        samples = [s for s in store.list_samples(product="brushed_metal", status="candidate")
                   if s["generator"] == "stroke"][:2]
        assert len(samples) == 2
        for s in samples:
            assert s["damage_type"] == "crack"
            out = store.load_sample_image(s["id"])
            mask = store.load_sample_mask(s["id"])
            src = store.load_image(s["source_image_id"])
            assert out.shape == src.shape and mask.shape == src.shape[:2]
            skel = skeletonize(mask > 0)
            Image.fromarray(np.hstack([src, out, np.repeat(mask[..., None], 3, 2)])).save(
                tmp_path / f"candidate_{s['id']}.png")
            assert skel.sum() >= 40, "the painted stroke did not arrive"
            width = mk.area(mask) / skel.sum()                  # mean width (px)
            assert 2.0 <= width <= 4.0, f"not a 3 px stroke: {width:.1f} px"
            changed = np.abs(out.astype(int) - src.astype(int)).max(axis=2) >= 8
            assert not (changed & (mk.dilate(mask, feather) == 0)).any()
            assert np.array_equal(out[mk.dilate(mask, feather) == 0], src[mk.dilate(mask, feather) == 0])
            cover = float(changed[skel].mean())
            assert cover >= 0.6, cover
    finally:
        store.close()
