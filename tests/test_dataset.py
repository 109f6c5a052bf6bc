"""The SQLite dataset store: round trips, bad inputs, concurrent writers and SIGKILL crash safety.

Every test works in a ``tmp_path`` workspace with small generated images (16-64 px).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.dataset import MAX_PIXELS, Store, StoreError
from studio.formats import import_any

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# generated data
# ---------------------------------------------------------------------------------------------
def rand_image(seed: int, size: int = 64) -> np.ndarray:
    """``[size x size x 3]`` uint8 noise, distinct per seed."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def rand_mask(seed: int, size: int = 64) -> np.ndarray:
    """``[size x size]`` uint8 0/255 blob mask."""
    rng = np.random.default_rng(seed + 10_000)
    m = np.zeros((size, size), np.uint8)
    y, x = rng.integers(2, size // 2, 2)
    m[y:y + size // 4, x:x + size // 4] = 255
    return m


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(root: Path, n_train: int = 4, n_test_good: int = 2, defects=("crack", "scratch"),
               n_defect: int = 2) -> Path:
    """A tiny MVTec AD category: train/good, test/good, test/<defect> + ground_truth masks."""
    seed = 0
    for i in range(n_train):
        save_png(root / "train" / "good" / f"{i:03d}.png", rand_image(seed := seed + 1))
    for i in range(n_test_good):
        save_png(root / "test" / "good" / f"{i:03d}.png", rand_image(seed := seed + 1))
    for d in defects:
        for i in range(n_defect):
            save_png(root / "test" / d / f"{i:03d}.png", rand_image(seed := seed + 1))
            save_png(root / "ground_truth" / d / f"{i:03d}_mask.png", rand_mask(seed))
    return root


def sample_kwargs(seed: int, size: int = 64, **over) -> dict:
    kw = dict(product="bottle", image=rand_image(seed, size), mask=rand_mask(seed, size),
              damage_type="crack", color="#aa3300", generator="perlin", generator_version="1.2",
              params={"strength": 0.5, "octaves": 3, "seed_offset": seed}, seed=seed)
    kw.update(over)
    return kw


def balance_counts(store: Store, product: str) -> dict:
    return {(r["product"], r["label"]): (r["real_train"], r["real_test"], r["synthetic_accepted"])
            for r in store.class_balance(product)}


def files_in(store: Store) -> list[Path]:
    return [p for p in store.files_dir.rglob("*") if p.is_file()]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "ws")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# basics
# ---------------------------------------------------------------------------------------------
def test_creates_workspace_with_wal_and_pragmas(tmp_path):
    ws = tmp_path / "nested" / "ws"
    with Store(ws) as s:
        assert (ws / "studio.db").is_file() and (ws / "files").is_dir()
        conn = s.db.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000
        assert {"images", "samples"} <= set(s.db.table_names())
        assert s.integrity_check() == "ok"
    with Store(ws) as s:  # schema creation is idempotent
        assert s.integrity_check() == "ok" and s.list_images() == []


def test_set_status_rejects_unknown_id_and_status(store):
    sid = store.add_sample(**sample_kwargs(1))
    with pytest.raises(StoreError, match="unknown sample id"):
        store.set_status(sid + 999, "accepted")
    with pytest.raises(StoreError, match="unknown status"):
        store.set_status(sid, "maybe")
    with pytest.raises(ValueError):  # StoreError is a ValueError
        store.accept("not-a-number")
    row = store.get_sample(sid)
    assert row["status"] == "candidate" and row["reviewed_at"] is None

    accepted = store.accept(sid, note="clean edge")
    assert accepted["status"] == "accepted" and accepted["note"] == "clean edge"
    assert accepted["reviewed_at"] and accepted["updated_at"] >= accepted["created_at"]
    rejected = store.reject(sid)
    assert rejected["status"] == "rejected" and rejected["note"] == "clean edge"
    assert store.set_status(sid, "candidate")["reviewed_at"] is None


def test_add_image_roundtrip_dedupe_and_validation(store, tmp_path):
    img, mask = rand_image(1), rand_mask(1)
    iid = store.add_image("bottle", img, split="test", label="crack", mask=mask)
    assert store.add_image("bottle", img.copy(), split="test", label="crack", mask=mask) == iid
    assert store.add_image("bottle", img, split="train", label="good") != iid  # other split/label
    np.testing.assert_array_equal(store.load_image(iid), img)
    np.testing.assert_array_equal(store.load_mask(iid), mask)
    row = store.get_image(iid)
    assert not Path(row["path"]).is_absolute() and row["width"] == row["height"] == 64
    assert row["created_at"].endswith("+00:00")

    # PIL and path inputs; a grayscale image becomes RGB
    pid = store.add_image("bottle", Image.fromarray(rand_image(2)), label="good")
    np.testing.assert_array_equal(store.load_image(pid), rand_image(2))
    gray = save_png(tmp_path / "gray.png", rand_image(3)[:, :, 0])
    gid = store.add_image("bottle", gray)
    assert store.load_image(gid).shape == (64, 64, 3)
    assert store.get_image(gid)["source_path"] == str(gray)
    assert store.load_mask(gid) is None

    n_files = len(files_in(store))
    for bad in (dict(product="../evil"), dict(split="val"), dict(origin="ai"), dict(label="a/b"),
                dict(mask=np.zeros((10, 10), np.uint8)), dict(image=np.zeros((8, 8, 3), np.float32))):
        kwargs = dict(product="bottle", image=rand_image(4), split="train", label="good")
        kwargs.update(bad)
        with pytest.raises(StoreError):
            store.add_image(kwargs.pop("product"), kwargs.pop("image"), **kwargs)
    with pytest.raises(StoreError, match="unknown image id"):
        store.get_image(12345)
    assert len(files_in(store)) == n_files  # refused inputs leave no files behind
    assert store.products() == ["bottle"] and store.labels("bottle") == ["good", "crack"]


def test_samples_list_filter_and_provenance(store):
    src = store.add_image("bottle", rand_image(0))
    ids = [store.add_sample(**sample_kwargs(i, source_image_id=src, batch_id="b1")) for i in range(1, 6)]
    store.add_sample(**sample_kwargs(9, product="cable", damage_type=None, params={"arr": np.arange(3)}))
    with pytest.raises(StoreError, match="unknown source image"):
        store.add_sample(**sample_kwargs(10, source_image_id=999))
    with pytest.raises(StoreError, match="mask"):
        store.add_sample(**sample_kwargs(11, mask=None))
    with pytest.raises(StoreError, match="JSON"):
        store.add_sample(**sample_kwargs(12, params={"f": object()}))
    assert len(store.list_samples()) == 6  # failed adds left no rows …
    referenced = {r["image_path"] for r in store.list_samples()} | {r["mask_path"] for r in store.list_samples()}
    assert {p.relative_to(store.root).as_posix() for p in files_in(store)} - referenced == {
        store.get_image(src)["path"]}  # … and no files

    store.accept(ids[0])
    store.reject(ids[1])
    newest = store.list_samples(product="bottle")
    assert [r["id"] for r in newest] == ids[::-1]
    assert [r["id"] for r in store.list_samples(product="bottle", limit=2, offset=1)] == ids[::-1][1:3]
    assert [r["id"] for r in store.list_samples(status="accepted")] == [ids[0]]
    assert store.list_samples(product="cable")[0]["params"] == {"arr": [0, 1, 2]}
    s = store.get_sample(ids[2])
    assert s["params"] == {"strength": 0.5, "octaves": 3, "seed_offset": 3} and s["seed"] == 3
    assert s["source_image_id"] == src and s["generator_version"] == "1.2" and s["batch_id"] == "b1"
    np.testing.assert_array_equal(store.load_sample_image(ids[2]), rand_image(3))
    np.testing.assert_array_equal(store.load_sample_mask(ids[2]), rand_mask(3))

    bal = {(r["product"], r["label"]): r for r in store.class_balance()}
    assert bal[("bottle", "crack")]["synthetic_accepted"] == 1
    assert bal[("bottle", "crack")]["rejected"] == 1 and bal[("bottle", "crack")]["candidates"] == 3
    assert bal[("bottle", "good")]["real_train"] == 1
    assert bal[("cable", "defect")]["candidates"] == 1  # no damage type → label 'defect'


def test_accepted_samples_survive_restart(tmp_path):
    ws = tmp_path / "ws"
    s = Store(ws)
    ids = [s.add_sample(**sample_kwargs(i)) for i in range(4)]
    for sid in ids[:3]:
        s.accept(sid, note=f"ok {sid}")
    before = s.list_samples(status="accepted")
    images = {sid: s.load_sample_image(sid) for sid in ids}
    masks = {sid: rand_mask(seed) for seed, sid in enumerate(ids)}
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_samples()

    s2 = Store(ws)
    assert s2.list_samples(status="accepted") == before
    assert len(before) == 3 and s2.get_sample(ids[3])["status"] == "candidate"
    for sid in ids:
        np.testing.assert_array_equal(s2.load_sample_image(sid), images[sid])
        np.testing.assert_array_equal(s2.load_sample_mask(sid), masks[sid])
    s2.close()

    moved = tmp_path / "moved-ws"  # relative paths: the workspace folder can be moved
    os.replace(ws, moved)
    with Store(moved) as s3:
        assert s3.dangling_rows() == []
        np.testing.assert_array_equal(s3.load_sample_image(ids[0]), images[ids[0]])


# ---------------------------------------------------------------------------------------------
# import / export
# ---------------------------------------------------------------------------------------------
def test_mvtec_import_export_reimport_round_trip(tmp_path):
    src = make_mvtec(tmp_path / "data" / "bottle")
    a = Store(tmp_path / "ws_a")
    report = a.import_mvtec(src)
    assert report["imported"] == 4 + 2 + 4 and report["skipped"] == []
    assert a.import_mvtec(src)["imported"] == 0  # idempotent
    assert len(a.list_images()) == 10
    cracked = a.list_images(product="bottle", split="test", label="crack")
    np.testing.assert_array_equal(a.load_mask(cracked[0]["id"]), rand_mask(7))

    good = a.list_images(split="train")[0]["id"]
    s1 = a.add_sample(**sample_kwargs(101, source_image_id=good, note="sharp"), status="accepted")
    s2 = a.add_sample(**sample_kwargs(102, damage_type="scratch", params={"nested": {"k": [1, 2]}}))
    a.accept(s2, note="subtle")
    s3 = a.add_sample(**sample_kwargs(103, damage_type=None, color="#ffffff"))
    a.accept(s3)
    a.add_sample(**sample_kwargs(104))                          # candidate: not exported
    a.reject(a.add_sample(**sample_kwargs(105)))                # rejected: not exported

    out = tmp_path / "export"
    result = a.export_mvtec(out, "bottle")
    root = out / "bottle"
    n_eval = len(a.list_images(product="bottle", role="evaluation"))
    assert result == {"path": str(root), "product": "bottle", "train": 4, "test": 6, "masks": 4, "synthetic": 3,
                      "evaluation": n_eval}
    listed = [ln for ln in (root / "evaluation.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(listed) == n_eval and all((root / rel).is_file() for rel in listed)
    assert sorted(p.name for p in (root / "test" / "crack").iterdir()) == ["000.png", "001.png"]
    assert (root / "ground_truth" / "crack" / "001_mask.png").is_file()
    assert (root / "synthetic" / "crack" / "000.png").is_file()
    assert (root / "synthetic_ground_truth" / "defect" / "000_mask.png").is_file()
    lines = [json.loads(x) for x in (root / "provenance.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {ln["file"] for ln in lines} == {
        "synthetic/crack/000.png", "synthetic/scratch/000.png", "synthetic/defect/000.png"}
    first = next(ln for ln in lines if ln["sample_id"] == s1)
    assert first["source_image"]["file"].startswith("train/good/") and first["created_at"]
    assert first["descends_from"] == [a.get_image(good)["sha256"]]   # provenance: its real ancestor

    b = Store(tmp_path / "ws_b")
    rep_b = b.import_mvtec(root)
    assert rep_b["images"] == 10 and rep_b["samples"] == 3 and rep_b["skipped"] == []
    assert balance_counts(b, "bottle") == balance_counts(a, "bottle")
    assert b.import_mvtec(root)["imported"] == 0  # idempotent, synthetic included
    roles = lambda st: sorted((r["sha256"], r["role"]) for r in st.list_images(product="bottle"))
    assert roles(b) == roles(a)                    # data roles travel with the export
    assert b.list_samples(damage_type="crack")[0]["ancestors"] == [a.get_image(good)["sha256"]]

    def provenance(store):
        return sorted((r["damage_type"] or "", r["generator"], r["generator_version"], json.dumps(r["params"]),
                       r["seed"], r["note"], r["color"] or "", r["created_at"], r["reviewed_at"])
                      for r in store.list_samples(status="accepted"))
    assert provenance(b) == provenance(a)
    crack_b = b.list_samples(damage_type="crack")[0]
    assert crack_b["generator"] == "perlin" and crack_b["seed"] == 101
    assert crack_b["params"] == {"strength": 0.5, "octaves": 3, "seed_offset": 101}
    np.testing.assert_array_equal(b.load_sample_image(crack_b["id"]), rand_image(101))
    np.testing.assert_array_equal(b.load_sample_mask(crack_b["id"]), rand_mask(101))
    # the source image is re-linked by content
    np.testing.assert_array_equal(b.load_image(crack_b["source_image_id"]), a.load_image(good))

    # re-export replaces a previous export; a foreign folder is never overwritten
    a.accept(a.list_samples(status="candidate")[0]["id"])
    assert a.export_mvtec(out, "bottle")["synthetic"] == 4
    assert len(list((root / "synthetic" / "crack").iterdir())) == 2
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(StoreError, match="not a previous Defect Studio export"):
        a.export_mvtec(tmp_path / "data", "bottle")
    assert len(list((src / "train" / "good").iterdir())) == 4
    with pytest.raises(StoreError, match="nothing to export"):
        a.export_mvtec(out, "cable")
    a.close()
    b.close()


def test_import_mvtec_synthetic_without_provenance_and_bad_folder(store, tmp_path):
    root = make_mvtec(tmp_path / "screw", n_train=1, n_test_good=0, defects=())
    save_png(root / "synthetic" / "dent" / "000.png", rand_image(50))
    save_png(root / "synthetic_ground_truth" / "dent" / "000_mask.png", rand_mask(50))
    save_png(root / "synthetic" / "dent" / "001.png", rand_image(51))  # no mask → skipped
    rep = store.import_mvtec(root, product="screw_v2")
    assert rep["images"] == 1 and rep["samples"] == 1
    assert len(rep["skipped"]) == 1 and "no mask" in rep["skipped"][0][1]
    s = store.list_samples(product="screw_v2")[0]
    assert s["status"] == "accepted" and s["generator"] == "external" and s["damage_type"] == "dent"
    with pytest.raises(StoreError, match="MVTec"):
        store.import_mvtec(tmp_path)
    with pytest.raises(StoreError, match="not a folder"):
        store.import_mvtec(tmp_path / "missing")


def test_import_visa_with_and_without_split_csv(tmp_path):
    visa = tmp_path / "VisA"
    cat = visa / "candle"
    normal = cat / "Data" / "Images" / "Normal"
    normal.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rand_image(i)).save(normal / f"{i:04d}.JPG", format="JPEG")
    for i in range(2):
        save_png(cat / "Data" / "Images" / "Anomaly" / f"{i:03d}.png", rand_image(20 + i))
        save_png(cat / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", (rand_mask(i) > 0).astype(np.uint8))
    with Store(tmp_path / "ws1") as s:
        rep = import_any(s, cat, "visa")
        assert rep["imported"] == 5 and rep["split_source"] == "folders" and rep["skipped"] == []
        assert len(s.list_images(product="candle", split="train", label="good")) == 3
        anomalies = s.list_images(product="candle", split="test", label="anomaly")
        assert len(anomalies) == 2
        assert set(np.unique(s.load_mask(anomalies[0]["id"]))) == {0, 255}  # 0/1 masks binarised
        assert import_any(s, cat, "visa")["imported"] == 0

    rows = ["object,split,label,image,mask",
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
            "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
            "candle,train,normal,candle/Data/Images/Normal/0002.JPG,",
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.png,candle/Data/Masks/Anomaly/000.png",
            "candle,test,anomaly,candle/Data/Images/Anomaly/001.png,candle/Data/Masks/Anomaly/001.png",
            "capsules,train,normal,capsules/Data/Images/Normal/0000.JPG,"]
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    with Store(tmp_path / "ws2") as s:
        rep = import_any(s, cat, "visa", "candle_csv")
        assert rep["split_source"] == "csv" and rep["imported"] == 5 and rep["skipped"] == []
        bal = {r["label"]: r for r in s.class_balance("candle_csv")}
        assert (bal["good"]["real_train"], bal["good"]["real_test"], bal["anomaly"]["real_test"]) == (2, 1, 2)


def test_import_folder_skips_bad_files_and_reports_them(store, tmp_path):
    folder = tmp_path / "incoming"
    save_png(folder / "a.png", rand_image(1))
    Image.fromarray(rand_image(2)).save(folder / "b.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_text("text pretending to be a png")
    Image.fromarray(rand_image(3, 128)).save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "sub").mkdir()  # not recursive
    save_png(folder / "sub" / "deep.png", rand_image(4))

    rep = import_any(store, folder, "folder", "widget", split="test", label="good")
    assert rep["imported"] == 2
    reasons = {Path(p).name: why for p, why in rep["skipped"]}
    assert set(reasons) == {"notes.txt", "fake.png", "truncated.png"}
    assert "not an image file" in reasons["notes.txt"]
    assert "not a readable image" in reasons["fake.png"]
    assert "not a readable image" in reasons["truncated.png"]
    assert len(store.list_images(product="widget", split="test")) == 2
    assert len(files_in(store)) == 2  # skipped files left neither rows nor files
    assert import_any(store, folder, "folder", "widget", split="test")["duplicates"] == 2
    with pytest.raises(StoreError):
        import_any(store, folder / "nope", "folder", "widget")


def test_too_large_images_are_refused(tmp_path):
    with Store(tmp_path / "small", max_pixels=1000) as s:
        with pytest.raises(StoreError, match="too large"):
            s.add_image("p", rand_image(1, 64))
    big = tmp_path / "big"
    big.mkdir()
    Image.new("1", (8000, 5001)).save(big / "huge.png")  # 40 M+ pixels, a few kB on disk
    save_png(big / "ok.png", rand_image(1, 16))
    assert 8000 * 5001 > MAX_PIXELS
    with Store(tmp_path / "ws") as s:
        rep = import_any(s, big, "folder", "p")
        assert rep["imported"] == 1
        assert len(rep["skipped"]) == 1 and "too large" in rep["skipped"][0][1]
        with pytest.raises(StoreError, match="too large"):
            s.add_image("p", Image.new("1", (8000, 5001)))


def test_gc_orphans_removes_only_unreferenced_files(store):
    iid = store.add_image("bottle", rand_image(1), mask=rand_mask(1))
    sid = store.add_sample(**sample_kwargs(2))
    orphan = save_png(store.files_dir / "bottle" / "images" / "deadbeef.png", rand_image(3))
    temp = store.files_dir / "bottle" / "samples" / ".tmp-123.png"
    temp.write_bytes(b"half written")
    assert store.gc_orphans() == 0  # young files are kept: their row may be about to commit
    assert store.gc_orphans(min_age_s=0) == 2
    assert not orphan.exists() and not temp.exists()
    assert store.dangling_rows() == []
    np.testing.assert_array_equal(store.load_image(iid), rand_image(1))
    np.testing.assert_array_equal(store.load_sample_image(sid), rand_image(2))
    os.remove(store.file_path(store.get_sample(sid)["mask_path"]))
    assert store.dangling_rows() == [f"samples {sid}: missing {store.get_sample(sid)['mask_path']}"]
    with pytest.raises(StoreError, match="missing"):
        store.load_sample_mask(sid)


# ---------------------------------------------------------------------------------------------
# concurrency and crash safety
# ---------------------------------------------------------------------------------------------
def _writer_process(workspace: str, worker: int, n: int) -> None:
    """Child of the concurrency test: its own Store, ``n`` accepted samples."""
    s = Store(workspace)
    for i in range(n):
        s.add_sample(product="bolt", image=rand_image(worker * 100_000 + i, 16),
                     mask=rand_mask(i, 16), damage_type="scratch", generator="test",
                     generator_version="0", params={"worker": worker, "i": i}, seed=i,
                     status="accepted", batch_id=f"w{worker}")
    s.close()


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    ws = tmp_path / "ws"
    Store(ws).close()
    n_proc, n_each = 8, 200
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(ws), w, n_each)) for w in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n_proc

    with Store(ws) as s:
        rows = s.list_samples(status="accepted")
        assert len(rows) == n_proc * n_each
        assert sorted((r["params"]["worker"], r["params"]["i"]) for r in rows) == \
            [(w, i) for w in range(n_proc) for i in range(n_each)]
        assert s.integrity_check() == "ok"
        assert s.dangling_rows() == []
        assert len(files_in(s)) == 2 * n_proc * n_each  # no orphans either: nothing crashed
        assert s.class_balance("bolt")[0]["synthetic_accepted"] == n_proc * n_each


def test_one_store_shared_by_threads(store):
    errors = []

    def work(t):
        try:
            for i in range(25):
                sid = store.add_sample(**sample_kwargs(t * 1000 + i, size=16))
                store.accept(sid)
                store.list_samples(limit=5)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_samples(status="accepted")) == 100
    assert store.integrity_check() == "ok" and store.dangling_rows() == []


CRASH_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from studio.dataset import Store
    store = Store(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    while True:
        img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        sid = store.add_sample(product="crash", image=img, mask=(img[..., 0] > 127).astype(np.uint8) * 255,
                               damage_type="scratch", generator="test", generator_version="0",
                               params={"p": 1}, seed=int(rng.integers(1000)))
        store.accept(sid)
        if rng.random() < 0.3:
            store.add_image("crash", img, split="test", label="scratch")
""")


def _count_samples(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    finally:
        conn.close()


def test_sigkill_during_writes_leaves_a_consistent_store(tmp_path):
    ws = tmp_path / "ws"
    rnd = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    total_before = 0
    for round_ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(ws), str(round_)], cwd=ROOT, env=env,
                                 stderr=subprocess.PIPE)
        target = total_before + rnd.randint(3, 40)
        deadline = time.monotonic() + 60
        try:
            while _count_samples(ws / "studio.db") < target:
                assert child.poll() is None, child.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the child made no progress"
                time.sleep(0.005)
            time.sleep(rnd.random() * 0.05)  # land somewhere inside a write
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL

        with Store(ws) as s:
            assert s.integrity_check() == "ok"
            assert s.dangling_rows() == []
            rows = s.list_samples(product="crash")
            assert len(rows) >= target
            total_before = len(rows)
            for r in rows[:3]:
                assert s.load_sample_image(r["id"]).shape == (24, 24, 3)
            s.gc_orphans(min_age_s=0)  # crash leftovers go; referenced files stay
            assert s.dangling_rows() == []
            referenced = {r["image_path"] for r in rows} | {r["mask_path"] for r in rows}
            referenced |= {r["path"] for r in s.list_images()}
            assert {p.relative_to(s.root).as_posix() for p in files_in(s)} == referenced
            new = s.add_sample(**sample_kwargs(round_, size=24, product="crash"))  # still writable
            assert s.accept(new)["status"] == "accepted"
            total_before += 1
