"""PatchCore on parts presented in any orientation (issue 27), on tiny synthetic images: a bank
trained on upright parts flags a turned good part with ``orient="none"`` and scores it as normal
with ``"augment"`` / ``"canonical"``; canonical maps come back to the image's own frame (a defect's
peak lands where the defect is); ``"auto"`` keeps aligned products exactly as ``"none"``; save /
load restore the option; tiles; the config is written once; the rotated-data script moves masks
with their images."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.orientation import Canonicalizer, gray, register, rotation_gain
from pipelines.patchcore import PatchCore, PatchCoreConfig

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128


def part(seed: int, angle: float = 0.0, defect: tuple[int, int] | None = None, size: int = SIZE) -> np.ndarray:
    """An asymmetric part (a bar with a notch, a hole off-centre and a tab on one end) on a
    uniform noisy background, turned counter-clockwise by ``angle`` degrees about the centre;
    ``defect``: a dark spot at (x, y) of the upright part, turned with it."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 120, np.float32) + rng.normal(0, 3, (size, size, 1))
    c = size // 2
    s = size / 128
    cv2.rectangle(img, (int(c - 40 * s), int(c - 14 * s)), (int(c + 40 * s), int(c + 14 * s)), (215, 205, 190), -1)
    cv2.rectangle(img, (int(c + 40 * s), int(c - 6 * s)), (int(c + 52 * s), int(c + 6 * s)), (215, 205, 190), -1)
    cv2.circle(img, (int(c - 22 * s), c), int(7 * s), (60, 60, 70), -1)
    cv2.rectangle(img, (int(c + 5 * s), int(c - 14 * s)), (int(c + 15 * s), int(c - 6 * s)), (120, 120, 120), -1)
    for k in range(-36, 40, 6):                                      # machining marks
        cv2.line(img, (int(c + k * s), int(c - 13 * s)), (int(c + k * s), int(c + 13 * s)), (200, 190, 175), 1)
    if defect is not None:
        cv2.circle(img, defect, int(4 * s), (30, 25, 20), -1)
    img += rng.normal(0, 2, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if angle:
        M = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, 1.0)
        img = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return img


def turned_point(xy: tuple[int, int], angle: float, size: int = SIZE) -> np.ndarray:
    M = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, 1.0)
    return M @ np.array([xy[0], xy[1], 1.0])


UPRIGHT = [part(i) for i in range(6)]
ANY_ANGLE = [part(i, angle) for i, angle in enumerate((0, 75, 160, 230, 290, 340))]


def model(**kw) -> PatchCore:
    return PatchCore(size=SIZE, coreset=0.25, **kw)


def test_augment_scores_a_turned_good_part_as_normal_where_none_flags_it():
    upright, turned = part(20), part(20, 90)
    plain = model(orient="none").fit(UPRIGHT)
    aug = model(orient="augment", orient_angles=4).fit(UPRIGHT)
    (s_up, s_turned), _ = plain.predict([upright, turned])
    assert s_turned > 1.5 * s_up, (s_up, s_turned)                   # 'none': the turned part is new
    (a_up, a_turned), _ = aug.predict([upright, turned])
    assert a_turned < 1.15 * a_up, (a_up, a_turned)                   # 'augment': it is normal
    assert aug.orientation["views_per_image"] == 4 and aug.config["orient"] == "augment"
    assert aug.bank_size == 4 * plain.bank_size


def test_canonical_scores_turned_parts_and_maps_back_to_the_image_frame():
    canon = model(orient="canonical").fit(ANY_ANGLE)
    plain = model(orient="none").fit(UPRIGHT)
    goods = [part(30 + i, a) for i, a in enumerate((20, 130, 250))]
    spot = (SIZE // 2 + 25, SIZE // 2 + 4)                          # on the bar, right of centre
    angle = 110.0
    bad = part(40, angle, defect=spot)
    scores, maps = canon.predict([*goods, bad])
    assert scores[3] > 1.3 * scores[:3].max(), scores
    # the map peak lies on the defect where it is in the (turned) image, not in the canonical frame
    y, x = np.unravel_index(np.argmax(maps[3]), maps[3].shape)
    assert np.hypot(*(np.array([x, y]) - turned_point(spot, angle))) < 10, (x, y, turned_point(spot, angle))
    assert maps.shape == (4, SIZE, SIZE)
    # the plain bank, trained upright, flags the turned good parts as much as the defect
    p_scores, _ = plain.predict([*goods, bad])
    assert p_scores[:3].max() > 0.7 * p_scores[3]


def test_registration_recovers_the_angle():
    ref = gray(part(0))
    for angle in (15.0, 100.0, 200.0, 320.0):
        pose = register(gray(part(1, angle)), ref)
        err = (pose.angle - angle + 180) % 360 - 180
        assert abs(err) < 4, (angle, pose.angle)


def test_auto_keeps_aligned_parts_exactly_as_none_and_turns_parts_in_any_orientation():
    auto = model().fit(UPRIGHT)                                       # orient="auto" is the default
    assert PatchCoreConfig().orient == "auto"
    assert auto.config["orient"] == "none" and auto.orientation["requested"] == "auto"
    assert auto.orientation["rotation_gain"] < 0.1
    plain = model(orient="none").fit(UPRIGHT)
    test = [part(50), part(51, defect=(70, 60))]
    a, ma = auto.predict(test)
    b, mb = plain.predict(test)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    turned = model().fit(ANY_ANGLE)
    assert turned.config["orient"] == "canonical" and turned.orientation["rotation_gain"] > 0.3


def test_rotation_gain_separates_aligned_from_turned_training_sets():
    for images, low in ((UPRIGHT, True), (ANY_ANGLE, False)):
        c = Canonicalizer()
        gain = rotation_gain(images, c, c.fit(images))
        assert (gain < 0.1) if low else (gain > 0.3), gain


@pytest.mark.parametrize("orient", ["canonical", "augment", "auto"])
def test_save_load_restores_the_orientation(tmp_path, orient):
    m = model(orient=orient, orient_angles=4).fit(ANY_ANGLE)
    m.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["orient"] == m.config["orient"] and cfg["orientation"]["requested"] == orient
    loaded = PatchCore.load(tmp_path / "m")
    assert loaded.config["orient"] == m.config["orient"]
    assert (loaded.canon is None) == (m.canon is None)
    test = [part(60, 45), part(61, 200, defect=(80, 60))]
    a, ma = m.predict(test)
    b, mb = loaded.predict(test)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(ma, mb, rtol=1e-5, atol=1e-6)


def test_legacy_model_without_orientation_loads_as_none(tmp_path):
    m = model(orient="none").fit(UPRIGHT[:2])
    m.save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("orient", "orient_angles", "orient_flip", "orient_jitter", "tiles", "orientation")}
    path.write_text(json.dumps(old))
    loaded = PatchCore.load(tmp_path / "m")
    assert loaded.config["orient"] == "none" and loaded.config["tiles"] == 1 and loaded.canon is None


def test_config_is_one_dataclass():
    names = PatchCoreConfig.names()
    m = PatchCore(backbone="random", size=64)
    assert tuple(m.config) == names
    assert {f.name for f in dataclasses.fields(PatchCoreConfig)} == set(names)
    with pytest.raises(TypeError):
        PatchCore(backbone="random", no_such_option=1)
    with pytest.raises(ValueError, match="orient"):
        PatchCore(backbone="random", orient="sideways")
    with pytest.raises(ValueError, match="tiles"):
        PatchCore(backbone="random", tiles=9)
    base = PatchCoreConfig(size=64, backbone="random", coreset=0.5)
    assert PatchCore(base, orient="none").config["coreset"] == 0.5


def test_tiles_quadruple_the_grid_and_keep_map_size():
    one = PatchCore(backbone="random", size=64, coreset=1.0, orient="none").fit(UPRIGHT[:2])
    two = PatchCore(backbone="random", size=64, coreset=1.0, orient="none", tiles=2).fit(UPRIGHT[:2])
    assert two.bank_size == 4 * one.bank_size and two.input_size == 128
    scores, maps = two.predict([part(3), part(4, defect=(70, 60))])
    assert maps.shape == (2, 64, 64) and scores[1] > scores[0]
    assert two.backbone_ms_per_image(UPRIGHT[:2]) > 0


def test_rotate_script_turns_images_and_masks_together(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from rotate_category import rotate_category
    src = tmp_path / "part"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (src / folder).mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(src / "train" / "good" / f"{i:03d}.png"), part(i))
    cv2.imwrite(str(src / "test" / "good" / "000.png"), part(9))
    spot = (90, 64)
    cv2.imwrite(str(src / "test" / "spot" / "000.png"), part(10, defect=spot))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(mask, spot, 4, 255, -1)
    cv2.imwrite(str(src / "ground_truth" / "spot" / "000_mask.png"), mask)
    angles = rotate_category(src, tmp_path / "rot", seed=3)
    assert angles == rotate_category(src, tmp_path / "rot2", seed=3)       # seeded
    assert len(set(angles.values())) == 5 and all(-180 <= a < 180 for a in angles.values())
    a = angles["test/spot/000.png"]
    m = cv2.imread(str(tmp_path / "rot" / "ground_truth" / "spot" / "000_mask.png"), cv2.IMREAD_GRAYSCALE)
    ys, xs = np.nonzero(m)
    assert np.hypot(xs.mean() - turned_point(spot, a)[0], ys.mean() - turned_point(spot, a)[1]) < 1.5
    img = cv2.imread(str(tmp_path / "rot" / "test" / "spot" / "000.png"))
    assert img[ys, xs].mean() < 60                                          # the dark spot is under the mask
    with pytest.raises(FileExistsError):
        rotate_category(src, tmp_path / "rot")
