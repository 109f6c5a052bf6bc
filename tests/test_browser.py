"""The whole loop in a real browser: Debian's Chromium driven by Playwright (no browser download).

pick a demo image → paint a mask with the mouse → generate 4 candidates → accept 2 → find them
in the Dataset tab, also after a page reload.
"""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def page(studio_server):
    url, _ = studio_server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1200})
        pg.set_default_timeout(60_000)
        pg.goto(url)
        pg.wait_for_selector("#generate")
        yield pg
        browser.close()


def _table_ids(pg) -> set[int]:
    # gradio 6 Dataframe: data cells carry data-testid="cell-ROW-COL"; column 0 is the sample id
    cells = pg.locator("#ds-table [role=gridcell][data-testid$='-0']").all_inner_texts()
    return {int(c.strip()) for c in cells if c.strip().isdigit()}


def test_paint_generate_accept_and_find_in_dataset(page, tmp_path):
    pg = page
    pg.click("#image-pick input")
    option = pg.locator("ul[role=listbox] li").filter(has_text="train/good").nth(2)
    wanted = option.inner_text().split()[0].lstrip("#")
    option.click()
    pg.wait_for_function(f"document.querySelector('#source-id input').value == '{wanted}'")

    # The editor re-renders with the new background; the mask preview (updated from the editor's
    # change event) showing the loaded image tells us it is ready for painting.
    pg.wait_for_function("document.querySelector('#annotate-status').innerText.includes('Loaded image #"
                         + wanted + "')")
    pg.wait_for_timeout(1000)
    preview_src = "document.querySelector('#mask-preview img')?.src"
    before = pg.evaluate(preview_src)

    # paint a stroke across the rim with the mouse (the brush is the active tool)
    box = pg.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    pg.mouse.move(cx - 50, cy - 90)
    pg.mouse.down()
    for i in range(1, 16):
        pg.mouse.move(cx - 50 + 6 * i, cy - 90 + 2 * i, steps=2)
    pg.mouse.up()
    # the feathered-mask preview is redrawn from the painted layer
    pg.wait_for_function(f"{preview_src} && {preview_src} !== {before!r}".replace("None", "null"))

    pg.click("#generate")
    pg.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item').length == 4")
    pg.wait_for_function("document.querySelector('#annotate-status').innerText.includes('4 candidate')")
    thumbs = pg.locator("#gallery .thumbnail-item")
    accepted = []
    for i in (0, 2):
        thumbs.nth(i).click()
        caption = thumbs.nth(i).inner_text()        # "#12 · seed 3 · perlin"
        sid = caption.split()[0].lstrip("#")
        pg.wait_for_function(f"document.querySelector('#selected input').value == '{sid}'")
        pg.fill("#note textarea", f"browser accept {i}")
        pg.click("#accept")
        pg.wait_for_function(
            f"document.querySelector('#annotate-status').innerText.includes('#{sid} accepted')")
        accepted.append(int(sid))
    assert len(set(accepted)) == 2

    pg.get_by_role("tab", name="Dataset").click()
    pg.wait_for_function("document.querySelectorAll('#ds-table [role=gridcell]').length >= 18")
    assert set(accepted) <= _table_ids(pg)
    pg.screenshot(path=str(tmp_path / "dataset.png"), full_page=True)

    # a reload shows the same state (it lives in the SQLite store, not the page)
    pg.reload()
    pg.wait_for_selector("#generate")
    pg.get_by_role("tab", name="Dataset").click()
    pg.wait_for_function("document.querySelectorAll('#ds-table [role=gridcell]').length >= 18")
    assert set(accepted) <= _table_ids(pg)


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
    pg.wait_for_function("document.querySelector('#rv-id input').value !== '0'")
    decided = []
    for key in ("a", "r", "a"):  # keyboard shortcuts: a = accept, r = reject
        before = pg.input_value("#rv-id input")
        pg.locator("body").click(position={"x": 5, "y": 5})
        pg.keyboard.press(key)
        pg.wait_for_function(f"document.querySelector('#rv-id input').value !== '{before}'")
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
