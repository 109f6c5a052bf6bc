"""pipelines.guard: the one check every learning route runs on the arrays it fits — exact pixel
copies (any extension) and near-duplicates (JPEG q=90, 0.5× resize, local edits) of a scored image
are refused with both files named; genuinely different photos of the product pass."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines import guard as G
from pipelines.imageio import ImageInputError, read_rgb
from pipelines.roles import LeakageError, folder_roles, pixel_hash

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"


def jpeg(a, q=90):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=q)
    return np.asarray(Image.open(b).convert("RGB"))


def half(a):
    return cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def roles():
    return folder_roles(BOTTLE)


@pytest.fixture(scope="module")
def scored(roles):
    return G.ScoredSet.from_roles(roles)


def test_scored_set_is_evaluation_plus_test_good(roles, scored):
    assert len(scored) == len(roles.evaluation) + len(roles.good)
    assert set(scored.names) == set(roles.rel(roles.evaluation)) | set(roles.rel(roles.good))


def test_copies_of_an_evaluation_image_are_refused_with_both_names(roles, scored):
    ev = roles.evaluation[0]
    name = str(ev.path.relative_to(BOTTLE))
    arr = read_rgb(ev.path)
    patch = arr.copy()
    h, w = arr.shape[:2]
    s = int((0.1 * h * w) ** 0.5)
    patch[:s, :s] = (255, 0, 255)                     # a "synthetic defect" painted on it (10 %)
    for label, copy, how in [("same", arr, "pixel-identical"), ("jpeg", jpeg(arr), "near-duplicate"),
                             ("half", half(arr), "near-duplicate"),
                             ("half+jpeg", jpeg(half(arr)), "near-duplicate"),
                             ("painted", patch, "near-duplicate")]:
        hit = scored.match(copy)
        assert hit is not None and hit[0] == name and hit[1].startswith(how), (label, hit)
        with pytest.raises(LeakageError) as exc:
            G.guard([(f"my/{label}.jpg", copy)], scored, "LoRA training data")
        msg = str(exc.value)
        assert msg.startswith("LoRA training data: my/") and name in msg and "roles --set" in msg


def test_test_good_copies_are_refused_too(roles, scored):
    g = roles.good[0]
    assert scored.match(jpeg(read_rgb(g.path)))[0] == str(g.path.relative_to(BOTTLE))


def test_different_photos_of_the_product_pass_and_hashes_are_of_the_arrays_given(roles, scored):
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))
    items = [(p.name, read_rgb(p)) for p in train] + [(str(s.path), read_rgb(s.path)) for s in roles.reference]
    items.append(("small reference", half(read_rgb(roles.reference[0].path))))
    hashes = G.guard(items, scored, "test")
    assert hashes == [pixel_hash(a) for _, a in items]


def test_many_offenders_are_counted(roles, scored):
    items = [(f"x{i}.png", read_rgb(s.path)) for i, s in enumerate(roles.evaluation + roles.good)]
    with pytest.raises(LeakageError, match=rf"and {len(items) - 5} more — {len(items)} of {len(items)}"):
        G.guard(items, scored, "bank")


def test_read_images_decodes_every_supported_extension(tmp_path, roles):
    arr = read_rgb(roles.evaluation[0].path)
    for ext in (".png", ".bmp", ".tif", ".webp"):
        Image.fromarray(arr).save(tmp_path / f"copy{ext}", **({"lossless": True} if ext == ".webp" else {}))
    Image.fromarray(arr).save(tmp_path / "copy.JPG", quality=90)
    (tmp_path / "notes.txt").write_text("not an image")
    got = G.read_images(tmp_path)
    assert [p.name for p, _ in got] == sorted(["copy.JPG", "copy.bmp", "copy.png", "copy.tif", "copy.webp"])
    scored = G.ScoredSet.from_images([("ev.png", arr)])
    for p, a in got:
        how = scored.match(a)[1]
        assert how == ("near-duplicate" if p.suffix == ".JPG" else "pixel-identical") or \
            (p.suffix == ".JPG" and how.startswith("near-duplicate")), (p, how)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageInputError, match="broken.png"):
        G.read_images(tmp_path)


def test_empty_scored_set_refuses_nothing():
    empty = G.ScoredSet.from_images([])
    assert len(empty) == 0 and empty.match(np.zeros((8, 8, 3), np.uint8)) is None
    assert G.guard([("a", np.zeros((8, 8, 3), np.uint8))], empty, "x") == [pixel_hash(np.zeros((8, 8, 3), np.uint8))]


def test_threshold_is_stated_and_between_copies_and_other_images():
    assert 0.5 <= G.NEAR_DUPLICATE_THRESHOLD <= 2.0
    assert ".jpg" in G.SUPPORTED_EXTENSIONS and ".webp" in G.SUPPORTED_EXTENSIONS
    assert f"= {G.NEAR_DUPLICATE_THRESHOLD}" in G.__doc__
