"""PatchCore and DDPM tabs as a user drives them through gradio_client: background jobs with
progress, results stored as runs, a cancelled DDPM training keeps its checkpoint."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

pytestmark = pytest.mark.slow


def _wait(client, prefix, jid, timeout=600):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.predict(jid, api_name=f"/{prefix}_job")
        if job["status"] not in ("running", "queued"):
            return job
        time.sleep(1)
    raise AssertionError(f"{prefix} job {jid} did not finish")


def test_patchcore_tab_single_bank(studio_server):
    url, _ = studio_server
    c = Client(url, verbose=False)
    jid, status, _ = c.predict("bottle", "", "single (normal patches only)", "efficientnet_lite0", 5, 256,
                               api_name="/patchcore_start")
    job = _wait(c, "patchcore", jid)
    assert job["status"] == "done", job.get("error")
    m = job["result"]["metrics"]
    assert m["image_auroc"] >= 0.99 and m["pixel_auroc"] >= 0.97
    runs = c.predict(api_name="/patchcore_runs")
    assert any(r[0] == job["result"]["run_id"] and r[-2] == "done" for r in runs["data"])
    with pytest.raises(Exception, match="accepted synthetic"):
        c.predict("brushed_metal", "", "dual: + real + accepted synthetic", "efficientnet_lite0", 5, 256,
                  api_name="/patchcore_start")


def test_ddpm_tab_train_cancel_resume_inspect_evaluate(studio_server):
    url, ws = studio_server
    c = Client(url, verbose=False)
    args = ["bottle", "", "tiny-ui", "gaussian", 5, 0, 64, 32, "tiny", 200, True]
    jid, _, _ = c.predict(*args, False, api_name="/ddpm_train_start")  # 5-minute budget …
    time.sleep(6)
    c.predict(jid, api_name="/ddpm_train_cancel")                         # … cancelled early
    job = _wait(c, "ddpm_train", jid)
    assert job["status"] == "done" and job["result"]["stopped"] == "cancelled"
    first = job["result"]["step"]
    assert (ws / "models" / "tiny-ui" / "config.json").is_file()          # the checkpoint was kept

    args[5] = first + 2                                                   # resume: 2 more steps
    jid, _, _ = c.predict(*args, True, api_name="/ddpm_train_start")
    job = _wait(c, "ddpm_train", jid)
    assert job["status"] == "done" and job["result"]["step"] == first + 2

    ckpt = str(ws / "models" / "tiny-ui")
    test_id = next(r["id"] for r in c.predict("bottle", api_name="/list_images")
                   if r["split"] == "test" and r["label"] != "good")
    *_, status = c.predict(ckpt, test_id, 50, "as trained", 0, api_name="/ddpm_inspect")
    assert status.startswith("depth 50 · image score")
    jid, _, _ = c.predict("bottle", "", ckpt, "40,80", "as trained", "color", api_name="/ddpm_eval_start")
    job = _wait(c, "ddpm_eval", jid)
    assert job["status"] == "done", job.get("error")
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(job["result"]["metrics"])
    with pytest.raises(Exception, match="integers"):
        c.predict("bottle", "", ckpt, "deep", "as trained", "color", api_name="/ddpm_eval_start")


def test_training_tab_runs_trainer_in_its_own_process(studio_server):
    url, ws = studio_server
    c = Client(url, verbose=False)
    kind = "pixel-inpaint (offline, trains from scratch)"
    jid, _, _ = c.predict(kind, "bottle", [], "real only", "", "pi-test", 15, 2, 4, 0, True,
                          api_name="/train_start")
    job = _wait(c, "train", jid)
    assert job["status"] == "done", job.get("error")
    assert job["result"]["step"] == 2 and Path(job["result"]["checkpoint"]).is_dir()
    # a second start resumes from the saved step
    jid, _, _ = c.predict(kind, "bottle", [], "real only", "", "pi-test", 15, 3, 4, 0, True,
                          api_name="/train_start")
    job = _wait(c, "train", jid)
    assert job["status"] == "done" and job["result"]["step"] == 3 and job["result"]["steps_this_run"] == 1
    with pytest.raises(Exception, match="accepted synthetic"):
        c.predict(kind, "brushed_metal", [], "real + accepted synthetic", "", "x", 15, 2, 4, 0, True,
                  api_name="/train_start")
