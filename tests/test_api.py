"""The annotate → generate → accept loop through gradio_client's named endpoints."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


def _path(x):
    """gradio_client returns files as a path string (or a FileData dict in some versions)."""
    if isinstance(x, dict):
        return _path(x.get("image") or x.get("path"))
    return x


def _mask_layer(path, w, h):
    layer = np.zeros((h, w, 4), np.uint8)
    layer[h // 3: h // 3 + 40, w // 3: w // 3 + 50] = (255, 45, 45, 255)
    Image.fromarray(layer).save(path)
    return layer[..., 3] > 0


def test_generate_and_accept_via_api(studio_server, tmp_path):
    url, _ = studio_server
    client = Client(url, verbose=False)
    images = client.predict("bottle", api_name="/list_images")
    assert images, "demo bottle images should be in the dataset"
    pick = next(r for r in images if r["split"] == "train")
    editor, src_id, _preview, status = client.predict(pick["id"], 4, api_name="/load_image")
    assert int(src_id) == pick["id"]
    assert "Loaded image" in status

    bg = np.asarray(Image.open(_path(editor["background"])).convert("RGB"))
    h, w = bg.shape[:2]
    painted = _mask_layer(tmp_path / "layer.png", w, h)
    Image.fromarray(bg).save(tmp_path / "bg.png")
    editor_value = {"background": handle_file(str(tmp_path / "bg.png")),
                    "layers": [handle_file(str(tmp_path / "layer.png"))],
                    "composite": handle_file(str(tmp_path / "bg.png"))}
    gallery, cands, selected, status = client.predict(
        editor_value, "bottle", pick["id"], "Damage type", "contamination", "#3366cc", "auto",
        4, 7, 4, 0.8, api_name="/generate")
    assert len(gallery) == 4 and len(cands) == 4
    ids = [c["sample_id"] for c in cands]
    assert len(set(ids)) == 4 and int(selected) == ids[0]
    # the candidates differ from the source only near the painted region
    from pipelines.masks import dilate
    outside = dilate(painted.astype(np.uint8) * 255, 4) == 0
    for item in gallery:
        cand = np.asarray(Image.open(_path(item)).convert("RGB"))
        assert cand.shape == bg.shape
        assert np.array_equal(cand[outside], bg[outside])
        assert not np.array_equal(cand[painted], bg[painted])

    for sid in ids[:2]:
        status, _ = client.predict(sid, "looks real", cands, api_name="/accept")
        assert "accepted" in status
    status, _ = client.predict(ids[2], "", cands, api_name="/reject")
    assert "rejected" in status

    table, _plot, roles = client.predict("bottle", "accepted", "", api_name="/list_samples")
    accepted = {int(r[0]) for r in table["data"] if r[0] is not None}
    assert set(ids[:2]) <= accepted and ids[2] not in accepted and ids[3] not in accepted


def test_wall_colour_mode_via_api(studio_server, tmp_path):
    url, _ = studio_server
    client = Client(url, verbose=False)
    pick = client.predict("brushed_metal", api_name="/list_images")[0]
    editor, *_ = client.predict(pick["id"], 4, api_name="/load_image")
    bg = _path(editor["background"])
    w, h = Image.open(bg).size
    _mask_layer(tmp_path / "wall.png", w, h)
    value = {"background": handle_file(bg), "layers": [handle_file(str(tmp_path / "wall.png"))],
             "composite": handle_file(bg)}
    gallery, cands, _, status = client.predict(
        value, "brushed_metal", pick["id"], "Wall colour", "scratch", "#c0392b", "auto", 2, 0, 4,
        0.8, api_name="/generate")
    assert [c["generator"] for c in cands] == ["wall-lab", "wall-lab"]
    assert "#c0392b" in status
    de = [float(item["caption"].split("ΔE2000 ")[1].split()[0]) for item in gallery]
    assert all(d < 2 for d in de)


def editor_value_of(editor):
    bg = _path(editor["background"])
    return {"background": handle_file(bg), "layers": [], "composite": handle_file(bg)}


def test_bad_inputs_give_clear_errors(studio_server, tmp_path):
    url, _ = studio_server
    client = Client(url, verbose=False)
    images = client.predict("bottle", api_name="/list_images")
    pick = images[0]
    editor, *_ = client.predict(pick["id"], 4, api_name="/load_image")
    bg_path = _path(editor["background"])
    empty = {"background": handle_file(bg_path), "layers": [], "composite": handle_file(bg_path)}
    with pytest.raises(Exception, match="empty"):
        client.predict(empty, "bottle", pick["id"], "Damage type", "contamination", "#3366cc",
                       "auto", 2, 0, 4, 0.8, api_name="/generate")
    with pytest.raises(Exception, match="Unknown damage type|not in the list of choices"):
        client.predict(empty, "bottle", pick["id"], "Damage type", "melted", "#3366cc",
                       "auto", 2, 0, 4, 0.8, api_name="/generate")
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(tmp_path / "notes.png")), "bottle", 4, api_name="/upload_image")
    wrong = tmp_path / "wrong_size_mask.png"
    Image.fromarray(np.full((100, 120), 255, np.uint8)).save(wrong)
    with pytest.raises(Exception, match="mask is 120×100 px but the image is"):
        client.predict(handle_file(str(wrong)), editor_value_of(editor), pick["id"], 4,
                       api_name="/upload_mask")
    with pytest.raises(Exception, match="Select a candidate"):
        client.predict(0, "", [], api_name="/accept")


def test_data_roles_shown_and_edited_via_api(studio_server):
    url, _ = studio_server
    client = Client(url, verbose=False)
    _table, _plot, roles = client.predict("bottle", "accepted", "", api_name="/list_samples")
    cols = roles["headers"]
    rows = [dict(zip(cols, r)) for r in roles["data"]]
    assert rows and {r["role"] for r in rows} == {"reference", "evaluation"}
    assert all(r["label"] != "good" for r in rows)
    pick = next(r for r in rows if r["role"] == "reference")
    status, after = client.predict(pick["id"], "evaluation", "bottle", api_name="/set_role")
    assert "now **evaluation**" in status
    changed = {r[0]: r[cols.index("role")] for r in after["data"]}
    assert changed[pick["id"]] == "evaluation"
    client.predict(pick["id"], "reference", "bottle", api_name="/set_role")   # put it back
    good = next(r for r in client.predict("bottle", api_name="/list_images") if r["label"] == "good")
    with pytest.raises(Exception, match="only real defect images have a role"):
        client.predict(good["id"], "evaluation", "bottle", api_name="/set_role")
