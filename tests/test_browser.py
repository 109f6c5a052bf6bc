"""The whole loop in a real browser: Debian's Chromium driven by Playwright (no browser download).

Your own photo (scikit-image's bundled coffee photo saved as JPEG) → a new product → paint a mask
with the mouse → generate → before / after view → accept with the keyboard → the sample is in the
Dataset tab with its provenance, also after a page reload. Then the Curation loop.
"""
from __future__ import annotations

import os

import pytest
from conftest import CHROMIUM, studio_page

pytestmark = pytest.mark.browser
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def page(studio_server):
    url, _ = studio_server
    with studio_page(url, height=1200) as pg:
        yield pg


def _table_ids(pg) -> set[int]:
    # gradio 6 Dataframe: data cells carry data-testid="cell-ROW-COL"; column 0 is the sample id
    cells = pg.locator("#ds-table [role=gridcell][data-testid$='-0']").all_inner_texts()
    return {int(c.strip()) for c in cells if c.strip().isdigit()}


def _status_has(pg, text: str, timeout: float = 60_000):
    pg.wait_for_function(f"document.querySelector('#annotate-status').innerText.includes({text!r})",
                         timeout=timeout)


def test_own_photo_paint_generate_accept_with_keyboard(page, tmp_path):
    """Upload a real JPEG photo as an image of the bottle product, paint, generate with the shipped
    pixel-inpaint model (assets/models/bottle), compare before / after and the zoom, accept with
    the A key; the sample shows in the Dataset tab with its provenance, also after a reload.
    (A new product made for one's own photos is covered in test_annotate_handlers.py.)"""
    from PIL import Image
    from skimage import data
    photo = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(photo, quality=90)      # 600×400 RGB photo
    pg = page
    assert pg.input_value("#product input") == "bottle"
    pg.locator("#upload input[type=file]").set_input_files(str(photo))
    _status_has(pg, "Uploaded coffee.jpg as an image of bottle")
    pg.wait_for_timeout(1000)

    box = pg.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    pg.mouse.move(cx - 60, cy - 20)
    pg.mouse.down()
    for i in range(1, 16):
        pg.mouse.move(cx - 60 + 8 * i, cy - 20 + 2 * i, steps=2)
    pg.mouse.up()
    pg.wait_for_timeout(1000)     # an empty mask would make Generate fail with "mask is empty"
    size = float(pg.locator("#brush-size input[type=number]").input_value())
    pg.locator("body").click(position={"x": 5, "y": 5})
    pg.keyboard.press("]")        # brush size on the keyboard; the painted stroke is kept
    pg.wait_for_function(f"Number(document.querySelector('#brush-size input[type=number]').value) > {size}")
    pg.wait_for_timeout(1000)

    pg.click("#damage input")
    pg.locator("ul[role=listbox] li").filter(has_text="contamination").first.click()
    pg.click("#backend input")
    pg.locator("ul[role=listbox] li").filter(has_text="pixel-inpaint").first.click()
    pg.get_by_text("Generator options", exact=True).click()
    for elem, value in (("#n", "2"), ("#opt-steps", "8")):    # two candidates, 8 sampling steps (CPU)
        box = pg.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    pg.click("#generate")
    _status_has(pg, "2 candidate", timeout=480_000)   # minutes on a loaded 2-core CPU
    pg.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item').length == 2")
    # before / after slider and the zoom on the defect region, with what the generator learned from
    pg.wait_for_selector("#before-after img")
    assert pg.locator("#defect-zoom img").count() >= 1
    caption = pg.inner_text("#candidate-caption")
    assert "Candidate 1 of 2" in caption and "pixel-inpaint: trained on" in caption
    assert "reference defects of contamination" in caption and "bottle/pixel-inpaint" in caption

    pg.keyboard.press("n")                                    # next candidate
    pg.wait_for_function("document.querySelector('#candidate-caption').innerText.includes('Candidate 2 of 2')")
    pg.locator("body").click(position={"x": 5, "y": 5})
    pg.keyboard.press("a")                                    # accept with the keyboard
    _status_has(pg, "accepted")
    sid = int(pg.inner_text("#annotate-status").split("#")[1].split()[0])
    assert "1 left to review" in pg.inner_text("#annotate-status")

    def find_in_dataset():
        pg.get_by_role("tab", name="Dataset").click()
        pg.wait_for_function("document.querySelectorAll('#ds-table [role=gridcell]').length >= 9")
        assert sid in _table_ids(pg)
        row = pg.locator("#ds-table [role=gridcell][data-testid$='-0']").filter(has_text=str(sid)).first
        row.click()
        pg.wait_for_selector("#ds-provenance", state="visible")
        pg.wait_for_function("document.querySelector('#ds-provenance').innerText.includes('pixel-inpaint')")
        text = pg.inner_text("#ds-provenance")
        assert "contamination" in text and "bottle" in text

    find_in_dataset()
    pg.screenshot(path=str(tmp_path / "dataset.png"), full_page=True)
    pg.reload()                        # the store, not the page, holds the state
    pg.wait_for_selector("#generate")
    find_in_dataset()


def _subtab(pg, name):
    pg.get_by_role("tab", name=name).click()


def test_curation_plan_batch_review_experiment(page, tmp_path):
    """plan → batch → review (keyboard and buttons) → experiment → stored result; reload keeps it."""
    pg = page
    pg.goto(pg.url)
    pg.wait_for_selector("#generate")
    _subtab(pg, "Curation")
    pg.fill("#cu-target input", "8")
    pg.click("#cu-plan")
    pg.wait_for_function("document.querySelectorAll('#cu-plan-table [role=gridcell]').length >= 8")
    pg.click("#batch-start")
    pg.wait_for_function("document.querySelector('#batch-status').innerText.includes('— done')",
                         timeout=300_000)

    _subtab(pg, "2 · Review")
    pg.click("#rv-load")
    pg.wait_for_function("document.querySelector('#rv-left').innerText.includes('sample #')")
    decided = []

    def current() -> str:
        return pg.inner_text("#rv-left").split("sample #")[1].split()[0]

    for key in ("a", "r", "a"):  # keyboard shortcuts: a = accept, r = reject
        before = current()
        pg.locator("body").click(position={"x": 5, "y": 5})
        pg.keyboard.press(key)
        pg.wait_for_function("!document.querySelector('#rv-left').innerText.includes("
                             f"'sample #{before} ')")
        decided.append((int(before), key))
    pg.click("#rv-accept")  # and the button
    pg.wait_for_timeout(500)

    _subtab(pg, "4 · Experiment")
    repeats = pg.locator("#cu-exp-repeats input[type=number]")
    repeats.fill("1")                 # one repeat: the protocol itself is tested in test_experiment.py
    repeats.press("Enter")
    pg.click("#experiment-start")
    pg.wait_for_function("document.querySelector('#experiment-status').innerText.includes('— done')",
                         timeout=600_000)
    pg.wait_for_function("document.querySelector('#cu-exp-table').innerText.includes('with_synthetic')")
    assert "Did synthetic data help?" in pg.inner_text("#cu-exp-report")
    pg.screenshot(path=str(tmp_path / "experiment.png"), full_page=True)

    pg.reload()
    pg.wait_for_selector("#generate")
    _subtab(pg, "Curation")
    _subtab(pg, "4 · Experiment")
    pg.wait_for_function("document.querySelector('#cu-exp-table').innerText.includes('with_synthetic')")
    _subtab(pg, "Dataset")
    pg.wait_for_function("document.querySelectorAll('#ds-table [role=gridcell]').length >= 18")
    ids = _table_ids(pg)
    for sid, key in decided:
        assert (sid in ids) == (key == "a")  # accepted ones listed (status filter: accepted)
