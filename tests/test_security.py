"""Names and paths a web user gives (studio.paths, studio.ui.checks), the paths the studio serves and
the public-bind rule (app.py): traversal, absolute, NUL / control-character and over-long names are
refused in every route; a server folder outside the data roots is refused (also through
gradio_client on a running app); the database is not downloadable; the happy paths still work."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DEMO, ROOT, free_port, start_app, stop_app

BAD_NAMES = ["../../x", "/tmp/abs-run", "a\x00b", "a\nb", "tab\there", "x" * 101, "a/b", "..", ".hidden",
             "C:\\x"]
GOOD_NAME = "my-run_1.v2"


# -- the one name check and the one folder check -----------------------------------------------------
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_by_the_one_check(name, tmp_path):
    from studio.paths import PathRefused, child
    from studio.store_types import StoreError, check_name
    with pytest.raises(StoreError, match="invalid run name"):
        check_name(name, "run")
    with pytest.raises(PathRefused):
        child(tmp_path, name, "run")
    assert child(tmp_path, GOOD_NAME, "run") == tmp_path / GOOD_NAME


def test_confine_keeps_paths_inside_the_roots(tmp_path):
    from studio.paths import PathRefused, confine
    ws, start, outside = tmp_path / "ws", tmp_path / "start", tmp_path / "outside"
    for d in (ws / "in", start, outside):
        d.mkdir(parents=True)
    roots = (ws.resolve(), start.resolve())
    assert confine(str(ws / "in"), roots) == (ws / "in").resolve()
    assert confine("sub/dir", roots, base=start) == (start / "sub" / "dir").resolve()    # relative: start
    (ws / "link-out").symlink_to(outside)
    for bad in (str(outside), "/etc", str(ws / ".." / "outside"), "../outside", str(ws / "link-out"), "~"):
        with pytest.raises(PathRefused, match="outside the folders this studio may use") as exc:
            confine(bad, roots, "import folder", base=start)
        assert str(ws.resolve()) in str(exc.value) and str(start.resolve()) in str(exc.value)  # roots named
    for bad, msg in (("", "give a"), (str(ws) + "/a\x00b", "control characters"), ("a\nb", "control"),
                     ("x/" * 3000, "characters long")):
        with pytest.raises(PathRefused, match=msg):
            confine(bad, roots, base=start)


def test_roots_from_the_environment(tmp_path):
    from studio.config import Settings
    ws = tmp_path / "ws"
    s = Settings.from_env(env={"DEFECT_STUDIO_WORKSPACE": str(ws)})
    assert s.roots == (ws.resolve(), Path.cwd().resolve())          # default: workspace + start folder
    a, b = tmp_path / "a", tmp_path / "b"
    s = Settings.from_env(env={"DEFECT_STUDIO_WORKSPACE": str(ws),
                               "DEFECT_STUDIO_DATA_ROOTS": f"{a}{os.pathsep}{b}{os.pathsep}"})
    assert s.roots == (a.resolve(), b.resolve())


# -- every route of the tabs (handlers, no server) ----------------------------------------------------
@pytest.fixture()
def strict_ctx(tmp_path):
    """A context with the default roots (workspace + start folder, not the temp folder) and the demo
    bottle; ``outside``: a real MVTec category folder outside both roots."""
    import shutil
    from studio.config import Settings
    from studio.context import StudioContext
    ws = tmp_path / "ws"
    ctx = StudioContext(Settings.from_env(env={"DEFECT_STUDIO_WORKSPACE": str(ws)}))
    ctx.store.import_mvtec(DEMO / "bottle")
    outside = tmp_path / "outside" / "bottle"
    shutil.copytree(DEMO / "bottle", outside)
    assert ctx.settings.roots == (ws.resolve(), Path.cwd().resolve())
    yield ctx, outside
    ctx.store.close()


def _refused(fn, *args, match="outside the folders this studio may use"):
    import gradio as gr
    with pytest.raises((gr.Error, ValueError), match=match):
        fn(*args)


def test_every_folder_route_refuses_a_folder_outside_the_roots(strict_ctx, tmp_path):
    from studio.runs import RunLog
    from studio.ui import annotate as A
    from studio.ui import dataset_tab as D
    from studio.ui import ddpm_tab as DD
    from studio.ui import patchcore_tab as P
    from studio.ui import training_controlnet as TC
    from studio.ui import training_tab as T
    from studio.ui import training_wall as TW
    ctx, outside = strict_ctx
    out = str(outside)
    before = ctx.store.query("SELECT COUNT(*) AS n FROM images")[0]["n"]
    _refused(D.do_import, ctx, out, "auto", "")
    _refused(D.do_import, ctx, "/etc", "folder", "etc")
    _refused(D.do_export, ctx, str(tmp_path / "export-out"), "bottle", "MVTec AD")
    _refused(D.do_export, ctx, str(tmp_path / "coco-out"), "bottle", "COCO (RLE masks)")
    _refused(DD.category_for, ctx, "", out)
    _refused(DD.grid_items, ctx, "", out, 2)
    _refused(DD.do_inspect, ctx, str(outside / "ck"), 1, 50, "as trained", 0)
    _refused(DD.start_eval, ctx, DD.DDPMState.of(ctx), "bottle", "", str(outside / "ck"), "50", "as trained",
             "color")
    state = T.TrainingState.of(ctx)
    _refused(T.train_command, ctx, "LoRA + damage embedding (SD 1.5 inpainting folder)", "bottle", [], "real only",
             str(outside), "", 15, 1, 4, 0, True)
    _refused(TC.controlnet_command, ctx, "bottle", [], "", str(outside), "", 5, 1, 0, True)      # initial ControlNet
    _refused(TC.controlnet_command, ctx, "bottle", [], "/models/sd", "", "", 5, 1, 0, True)      # model folder
    _refused(TW.wall_command, ctx, out, "", "", "", 15, 1, 4, 0.3, "none (unconditional)", "median", 0, "", True)
    _refused(A.confined_options, ctx, {"model": str(outside), "steps": 5})
    _refused(A.confined_options, ctx, {"lora": "../../../etc/lora.safetensors"})
    # the PatchCore tab's folder (and, behind it, the job manager's check of every request)
    _refused(P.start, ctx, RunLog(ctx.settings.workspace), "", out, list(P.BANKS)[0], "efficientnet_lite0", 5, 256)
    assert ctx.jobs.list() == []                                   # nothing was queued
    assert ctx.store.query("SELECT COUNT(*) AS n FROM images")[0]["n"] == before
    assert not (tmp_path / "export-out").exists() and not (tmp_path / "coco-out").exists()
    del state


def test_patchcore_folder_outside_the_roots_says_nothing_about_whether_it_exists(strict_ctx, tmp_path):
    """The roots are checked before existence: a missing and an existing folder outside them get the
    same refusal; inside the roots a missing folder is named as missing."""
    import gradio as gr
    from studio.runs import RunLog
    from studio.ui import patchcore_tab as P
    ctx, outside = strict_ctx
    messages = []
    for folder in (outside, outside / "no-such-folder", "/no/such/folder"):
        with pytest.raises(gr.Error) as exc:
            P._category(ctx, "", str(folder), "single", "stamp")
        messages.append(str(exc.value))
        assert "outside the folders this studio may use" in str(exc.value) and "not a folder" not in str(exc.value)
    with pytest.raises(gr.Error, match="is not a folder on the server"):
        P._category(ctx, "", str(ctx.settings.workspace / "missing"), "single", "stamp")
    _refused(P.start, ctx, RunLog(ctx.settings.workspace), "", str(outside / "gone"), list(P.BANKS)[0],
             "efficientnet_lite0", 5, 256)
    assert ctx.jobs.list() == []


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs-run", "a\x00b", "x" * 101])
def test_every_name_route_refuses_a_bad_name(strict_ctx, tmp_path, name):
    from studio.ui import dataset_tab as D
    from studio.ui import ddpm_tab as DD
    from studio.ui import training_controlnet as TC
    from studio.ui import training_tab as T
    from studio.ui import training_wall as TW
    ctx, outside = strict_ctx
    ws = ctx.settings.workspace
    photos = ws / "photos"
    photos.mkdir()
    match = "[Ii]nvalid (run|checkpoint|product) name"
    _refused(T.train_command, ctx, list(T.KINDS)[0], "bottle", [], "real only", "", name, 15, 1, 4, 0, True,
             match=match)
    _refused(TC.controlnet_command, ctx, "bottle", [], "", "", name, 5, 1, 0, True, match=match)
    _refused(TW.wall_command, ctx, str(photos), "", "", name, 15, 1, 4, 0.3, "none (unconditional)", "median", 0,
             "", True, match=match)
    _refused(DD.start_train, ctx, DD.DDPMState.of(ctx), "bottle", "", name, "gaussian", 5, 1, 64, 32, "tiny", 200,
             True, False, match=match)
    _refused(T.train_command, ctx, list(T.KINDS)[0], name, [], "real only", "", "", 15, 1, 4, 0, True, match=match)
    _refused(DD.start_train, ctx, DD.DDPMState.of(ctx), name, "", "", "gaussian", 5, 1, 64, 32, "tiny", 200,
             True, False, match=match)
    _refused(D.do_export, ctx, str(ws / "exports" / "x"), name, "MVTec AD", match=match)
    _refused(D.do_import, ctx, str(DEMO / "bottle"), "mvtec", name, match=match)
    assert not (tmp_path / "x").exists() and not Path("/tmp/abs-run").exists()
    assert not (ws / "exports").exists() and not (ws / "adapters").exists() and not (ws / "models").exists()
    assert ctx.store.products() == ["bottle"]


def test_generate_refuses_a_product_name_that_is_a_path():
    from studio.services import GenerateRequest, UserError, generate
    img = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    for name in ("../../x", "/abs", "a\x00b"):
        with pytest.raises(UserError, match="invalid product name"):
            generate(GenerateRequest(image=img, mask=mask, damage_type="scratch", product=name, backend="perlin"))


def test_happy_paths_inside_the_roots(strict_ctx):
    """A normal name and folders inside the roots still work (import, export, run folder, model)."""
    from studio.ui import annotate as A
    from studio.ui import dataset_tab as D
    from studio.ui import ddpm_tab as DD
    from studio.ui import training_tab as T
    ctx, _ = strict_ctx
    ws = ctx.settings.workspace
    status, _ = D.do_import(ctx, str(DEMO / "brushed_metal"), "auto", "")     # DEMO: inside the start folder
    assert status.startswith("Imported (mvtec)")
    status = D.do_export(ctx, str(ws / "out"), "bottle", "MVTec AD")
    assert (ws / "out" / "bottle" / "train" / "good").is_dir() and "Exported" in status
    run = T.train_command(ctx, list(T.KINDS)[0], "bottle", [], "real only", "", GOOD_NAME, 15, 1, 4, 0, True)
    assert run.out == ws / "adapters" / GOOD_NAME
    sd = ws / "sd"
    sd.mkdir()
    lora = T.train_command(ctx, "LoRA + damage embedding (SD 1.5 inpainting folder)", "bottle", [], "real only",
                           str(sd), "", 15, 1, 4, 0, True)
    assert lora.cmd[-2:] == ["--model", str(sd)] and lora.out.name == "lora-bottle"
    assert DD.category_for(ctx, "", str(DEMO / "bottle"))[1] == "bottle"
    opts = {"model": str(sd), "lora": "org/some-hub-id", "steps": 5}
    assert A.confined_options(ctx, opts) == opts                           # unchanged (hub ids too)


def test_job_manager_checks_every_request(tmp_path):
    from functools import partial
    from studio.jobs import JobManager
    from studio.paths import PathRefused, confine_request
    jobs = JobManager(tmp_path / "jobs.db", check_request=partial(confine_request, roots=(tmp_path.resolve(),)))
    with pytest.raises(PathRefused, match="data path '/etc'"):
        jobs.submit("x", lambda j: None, request={"data": "/etc", "out": str(tmp_path / "o")})
    assert jobs.list() == []
    jid = jobs.submit("x", lambda j: 1, request={"data": str(tmp_path / "d"), "n": 3})
    assert jobs.wait(jid, 10)["status"] == "done"


def test_visa_csv_paths_stay_inside_the_category(tmp_path):
    from studio.dataset import Store
    from studio.formats import import_any
    root = tmp_path / "VisA"
    cat = root / "candle"
    (cat / "Data" / "Images" / "Normal").mkdir(parents=True)
    (cat / "Data" / "Images" / "Anomaly").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(cat / "Data/Images/Normal/000.png")
    secret = tmp_path / "secret.png"          # outside the category folder (beside the dataset)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(secret)
    (root / "secret2.png").write_bytes(secret.read_bytes())
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerow(["candle", "train", "normal", "candle/Data/Images/Normal/000.png", ""])
        w.writerow(["candle", "train", "normal", str(secret), ""])                        # absolute
        w.writerow(["candle", "train", "normal", "candle/../../secret.png", ""])          # ..
        w.writerow(["candle", "train", "normal", "secret2.png", ""])    # the dataset root: read in candle/ only
    with Store(tmp_path / "ws") as s:
        rep = import_any(s, cat, "visa")
        assert rep["imported"] == 1 and rep["split_source"] == "csv"
        reasons = " ".join(r for _, r in rep["skipped"])
        assert reasons.count("leaves the category folder") == 2 and len(rep["skipped"]) == 3
        assert "candle/secret2.png does not exist" in reasons
        assert len(s.list_images(product="candle")) == 1


# -- what the studio serves, and the public bind -------------------------------------------------------
def test_served_paths_are_the_image_folders_without_the_databases(tmp_path):
    import app
    from studio.config import Settings
    ws = tmp_path / "ws"
    allowed, blocked = app.served_paths(Settings.from_env(workspace=ws))
    assert sorted(allowed) == sorted(str(ws / d) for d in ("files", "runs", "exports"))
    assert str(ws) not in allowed
    for db in ("studio.db", "studio.db-wal", "studio.db-shm", "jobs.db", "jobs.db-wal"):
        assert str(ws / db) in blocked


def test_public_bind_needs_a_login(tmp_path):
    import app
    from studio.config import Settings
    for host, auth, flag, ok in (("127.0.0.1", None, False, True), ("localhost", None, False, True),
                                 ("::1", None, False, True), ("0.0.0.0", None, False, False),
                                 ("192.168.1.20", None, False, False), ("studio.example", None, False, False),
                                 ("0.0.0.0", "u:p", False, True), ("0.0.0.0", None, True, True)):
        env = {"DEFECT_STUDIO_WORKSPACE": str(tmp_path / "ws"), "DEFECT_STUDIO_HOST": host}
        if auth:
            env["DEFECT_STUDIO_AUTH"] = auth
        assert (app.bind_refusal(Settings.from_env(env=env), flag) is None) == ok, (host, auth, flag)
    env = {k: v for k, v in os.environ.items() if k != "DEFECT_STUDIO_AUTH"}
    r = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(free_port()),
                        "--workspace", str(tmp_path / "ws")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "refusing to serve on 0.0.0.0" in r.stderr and "DEFECT_STUDIO_AUTH" in r.stderr
    assert "--insecure-no-auth" in r.stderr and not (tmp_path / "ws").exists()
    # the explicit flag starts it, and says so loudly
    port = free_port()
    log = tmp_path / "insecure.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(port),
                                 "--insecure-no-auth", "--workspace", str(tmp_path / "ws")], cwd=ROOT,
                                env=dict(env, DEFECT_STUDIO_DEMO="none", DEFECT_STUDIO_EXAMPLES="none"),
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if _status(f"http://127.0.0.1:{port}/") == 200 or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None and _status(f"http://127.0.0.1:{port}/") == 200
        assert "WITHOUT A LOGIN" in log.read_text()
    finally:
        stop_app(proc)


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """A running studio with the default roots (the workspace and the repository it starts in)."""
    base = tmp_path_factory.mktemp("strict")
    ws = base / "workspace"
    ws.mkdir()
    proc, url, _ = start_app(ws, free_port(), extra_env={"DEFECT_STUDIO_DATA_ROOTS": ""})
    yield url, ws, base
    stop_app(proc)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_running_app_refuses_folders_outside_the_roots_and_serves_no_database(strict_server):
    import shutil
    from gradio_client import Client
    url, ws, base = strict_server
    c = Client(url, verbose=False)
    outside = base / "outside" / "brushed_metal"
    shutil.copytree(DEMO / "brushed_metal", outside)
    for args, api in (((str(outside), "auto", ""), "/import_folder"), (("/etc", "folder", "etc"), "/import_folder"),
                      ((str(base / "exp"), "bottle", "MVTec AD"), "/export")):
        with pytest.raises(Exception, match="outside the folders this studio may use"):
            c.predict(*args, api_name=api)
    assert not (base / "exp").exists()
    # happy path: a folder inside the roots (the repository the studio started in; the workspace)
    status, _ = c.predict(str(DEMO / "brushed_metal"), "auto", "", api_name="/import_folder")
    assert status.startswith("Imported (mvtec)")
    status = c.predict(str(ws / "exports" / "mine"), "bottle", "MVTec AD", api_name="/export")
    assert "Exported **bottle**" in status
    # served paths: the store's images yes, the database (and its WAL) no, on both file routes
    image = next((ws / "files").rglob("*.png"))
    assert _status(f"{url}gradio_api/file={image}") == 200
    assert (ws / "studio.db").exists()
    for name in ("studio.db", "studio.db-wal", "jobs.db"):
        for route in ("file=", "gradio_api/file="):
            assert _status(f"{url}{route}{ws / name}") in (403, 404), (route, name)
    assert _status(f"{url}gradio_api/file={ws / 'exports' / 'mine' / 'bottle' / 'evaluation.txt'}") == 200
