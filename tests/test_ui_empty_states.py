"""Every tab of a fresh studio, rendered in Chromium: each empty state says what to do next and
how long it takes, no plot with bare axes or table with placeholder headers is shown, and no
widget shows an internal id (source image, sample, plan, job ids live in session state)."""
from __future__ import annotations

import os
import re

import pytest
from conftest import CHROMIUM, studio_page

pytestmark = pytest.mark.browser
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

# (tab, sub-tab or None, guidance the user must see: what to do next, and how long it takes)
GUIDANCE = [
    ("Annotate", None, [r"No candidates yet", r"Generate candidates", r"second"]),
    ("Dataset", None, [r"No samples match", r"Annotate", r"second"]),
    ("Curation", "1 · Plan & batch", [r"Preview plan", r"No batch yet", r"second"]),
    ("Curation", "2 · Review", [r"Load queue"]),
    ("Curation", "3 · Quality", [r"a few seconds"]),
    ("Curation", "4 · Experiment", [r"No experiment yet", r"min"]),
    ("Training", None, [r"No model trained here yet", r"min"]),
    ("PatchCore", None, [r"No PatchCore run yet", r"\d+–\d+ s"]),
    ("DDPM", "Train", [r"No DDPM trained yet", r"minutes"]),
    ("DDPM", "Inspect", [r"Pick a checkpoint", r"seconds"]),
    ("DDPM", "Evaluate", [r"No DDPM evaluation yet", r"minute"]),
]

# visible labels, any of which would be internal plumbing
ID_LABEL = re.compile(r"\b(id|ids|job id|plan id|sample id|source image id|candidate id)\b|sample ids",
                      re.IGNORECASE)

VISIBLE_PROBLEMS_JS = """
() => {
  const vis = (el) => !!(el.offsetParent || el.getClientRects().length) &&
                      getComputedStyle(el).visibility !== 'hidden';
  const labels = [...document.querySelectorAll('label, [data-testid=block-label], [data-testid=block-info]')]
      .filter(vis).map(e => e.innerText.trim()).filter(Boolean);
  const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(vis)
      .filter(p => !(p.data && p.data.length)).length;
  const headers = [...document.querySelectorAll('table thead')].filter(vis)
      .map(h => [...h.querySelectorAll('th')].map(t => t.innerText.trim()).filter(Boolean).join(' '))
      .filter(t => /^1 2( 3)?$/.test(t));
  const idInputs = [...document.querySelectorAll('input[type=number]')].filter(vis)
      .map(i => i.closest('.block')?.innerText.trim().split('\\n')[0] || '');
  return {labels, emptyPlots: plots, placeholderHeaders: headers, numberInputs: idInputs};
}
"""


@pytest.fixture(scope="module")
def fresh(studio_server):
    """A browser page on a studio served from a fresh workspace."""
    url, _ = studio_server
    with studio_page(url) as pg:
        pg.wait_for_timeout(1500)          # page-load refreshes
        yield pg


def test_every_tab_guides_and_shows_no_internal_id(fresh):
    pg = fresh
    for tab, sub, patterns in GUIDANCE:
        pg.get_by_role("tab", name=tab, exact=True).click()
        if sub:
            pg.get_by_role("tab", name=sub, exact=True).click()
        pg.wait_for_timeout(400)
        text = pg.locator("body").inner_text()
        for pattern in patterns:
            assert re.search(pattern, text), f"{tab}/{sub}: no guidance matching {pattern!r}"
        found = pg.evaluate(VISIBLE_PROBLEMS_JS)
        bad = [label for label in found["labels"] if ID_LABEL.search(label)]
        assert not bad, f"{tab}/{sub}: widgets showing internal ids: {bad}"
        assert found["emptyPlots"] == 0, f"{tab}/{sub}: an empty plot is shown"
        assert not found["placeholderHeaders"], f"{tab}/{sub}: a table with placeholder headers"
        assert "Traceback" not in text


def test_upload_photo_formats_and_a_mask_in_the_browser(fresh, tmp_path):
    """Drop-in uploads through the page: 16-bit greyscale PNG, RGBA PNG, TIFF; then a mask file."""
    import numpy as np
    from PIL import Image
    pg = fresh
    pg.get_by_role("tab", name="Annotate", exact=True).click()
    rng = np.random.default_rng(0)
    grey16 = (rng.integers(0, 65535, (300, 420))).astype(np.uint16)
    rgba = np.dstack([rng.integers(0, 255, (300, 420, 3)), np.full((300, 420), 180)]).astype(np.uint8)
    files = {"grey16.png": Image.fromarray(grey16), "rgba.png": Image.fromarray(rgba),
             "photo.tiff": Image.fromarray(rgba[..., :3])}
    for name, im in files.items():
        im.save(tmp_path / name)
        pg.locator("#upload input[type=file]").set_input_files(str(tmp_path / name))
        pg.wait_for_function("document.querySelector('#annotate-status').innerText.includes("
                             f"'Uploaded {name} as an image of')")
        assert "420×300" in pg.inner_text("#annotate-status")
    mask = np.zeros((300, 420), np.uint8)
    mask[100:160, 150:260] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    pg.get_by_text("Mask from a file · feathered preview").click()
    pg.locator("#mask-upload input[type=file]").set_input_files(str(tmp_path / "mask.png"))
    pg.wait_for_selector("#mask-preview img")
    pg.click("#backend input")
    pg.locator("ul[role=listbox] li").filter(has_text="perlin").first.click()
    pg.click("#generate")                      # the uploaded mask is the painted region
    pg.wait_for_function("document.querySelector('#annotate-status').innerText.includes('4 candidate')",
                         timeout=120_000)


def test_drag_and_drop_a_photo_onto_the_upload_area(fresh):
    """A file dragged from the desktop and dropped on the upload area (the drop events a browser
    fires, carrying a DataTransfer with the file) becomes an image of the current product."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    pg = fresh
    pg.get_by_role("tab", name="Annotate", exact=True).click()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 260, 3)).astype(np.uint8)).save(buf, "PNG")
    dt = pg.evaluate_handle("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        return dt; }""", [base64.b64encode(buf.getvalue()).decode(), "dropped.png"])
    zone = pg.locator("#upload button[aria-dropeffect]").first
    for event in ("dragenter", "dragover", "drop"):
        zone.dispatch_event(event, {"dataTransfer": dt})
    pg.wait_for_function("document.querySelector('#annotate-status').innerText.includes('Uploaded dropped.png')")
    assert "260×200" in pg.inner_text("#annotate-status")
