"""Services shared by UI and CLI: good bypass, cut-paste donors from the store, wall colour,
provenance recorded; and the architecture rule that pipelines/ never imports gradio or studio."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from pipelines.masks import dilate
from studio.services import GenerateRequest, UserError, generate, review

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def store(bottle_store):
    return bottle_store


def _source(store):
    row = store.list_images(product="bottle", split="train")[0]
    return row["id"], store.load_image(row["id"])


def _mask(shape):
    m = np.zeros(shape[:2], np.uint8)
    m[50:90, 120:170] = 255
    return m


def test_good_bypasses_generation(store):
    sid, img = _source(store)
    cands = generate(GenerateRequest(image=img, mask=None, damage_type="good", product="bottle",
                                     source_image_id=sid), store=store)
    assert len(cands) == 1 and np.array_equal(cands[0].image, img)
    row = store.get_sample(cands[0].sample_id)
    assert row["damage_type"] == "good" and row["generator"] == "none"


def test_cut_paste_uses_reference_defects_as_donors(store):
    sid, img = _source(store)
    mask = _mask(img.shape)
    cands = generate(GenerateRequest(image=img, mask=mask, damage_type="contamination", backend="cutpaste",
                                     product="bottle", n=2, seed=3, source_image_id=sid), store=store)
    assert [c.generator for c in cands] == ["cutpaste", "cutpaste"]
    outside = dilate(mask, 4) == 0
    for c in cands:
        assert np.array_equal(c.image[outside], img[outside])
        row = store.get_sample(c.sample_id)
        assert row["status"] == "candidate" and row["source_image_id"] == sid
        ref = store.reference_defects("bottle", "contamination")
        assert row["params"]["n_donors"] == len(ref) == 2 and row["seed"] == c.seed  # 40 % of 5
        assert sorted(row["params"]["donor_ids"]) == sorted(r["id"] for r in ref)
        # provenance: the source image and every donor, none of them an evaluation image
        assert set(row["ancestors"]) == {r["sha256"] for r in ref} | {store.get_image(sid)["sha256"]}
        assert not set(row["params"]["donor_ids"]) & {r["id"] for r in store.list_images(role="evaluation")}
        assert np.array_equal(store.load_sample_image(c.sample_id), c.image)
        assert np.array_equal(store.load_sample_mask(c.sample_id) > 0, mask > 0)
    assert review(store, cands[0].sample_id, "accepted", "ok")["status"] == "accepted"
    with pytest.raises(UserError):
        review(store, cands[1].sample_id, "maybe")


def test_cut_paste_without_donors_is_a_clear_error(tmp_path):
    img = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:40] = 255
    with pytest.raises(UserError, match="cutpaste needs at least one real"):
        generate(GenerateRequest(image=img, mask=mask, damage_type="scratch",
                                 backend="cutpaste"), store=None)


def test_wall_colour_request_and_exclusive_choice():
    from skimage import data

    from pipelines.color import color_metrics
    img = data.coffee()
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[20:200, 350:560] = 255
    cands = generate(GenerateRequest(image=img, mask=mask, color="#2e7d32", n=2))
    assert all(c.generator == "wall-lab" for c in cands)
    assert color_metrics(cands[0].image, mask, "#2e7d32")["delta_e2000"] < 2
    with pytest.raises(UserError, match="exactly one"):
        generate(GenerateRequest(image=img, mask=mask, color="#2e7d32", damage_type="scratch"))
    with pytest.raises(UserError, match="wall colours"):
        generate(GenerateRequest(image=img, mask=mask, damage_type="scratch", backend="wall-lab"))
    with pytest.raises(UserError, match="1..16"):
        generate(GenerateRequest(image=img, mask=mask, damage_type="scratch", n=0))


def test_pipelines_never_import_gradio_or_studio():
    for path in (ROOT / "pipelines").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("gradio", "studio"), f"{path.name} imports {n}"


def test_only_ui_imports_gradio():
    for path in list((ROOT / "studio").glob("*.py")):
        src = path.read_text()
        assert "import gradio" not in src, f"{path.name} imports gradio outside studio/ui"
