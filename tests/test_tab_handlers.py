"""Dataset and PatchCore tab handlers (and the job panel's) called directly with a context built on a
temporary workspace (no server): happy paths and the refusals a user sees as ``gr.Error``."""
from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import pytest

from studio.config import Settings
from studio.context import StudioContext
from studio.runs import RunLog
from studio.ui import dataset_tab as D
from studio.ui import jobs_panel as J
from studio.ui import patchcore_tab as P

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    """A workspace with the demo bottle imported once (paths in the store are relative)."""
    ws = tmp_path_factory.mktemp("template") / "ws"
    c = StudioContext(Settings.from_env(workspace=ws))
    c.store.import_mvtec(DEMO / "bottle")
    c.store.close()
    return ws


@pytest.fixture
def ctx(demo_workspace, tmp_path):
    """A fresh context per test on its own copy of the demo workspace."""
    shutil.copytree(demo_workspace, tmp_path / "ws")
    return StudioContext(Settings.from_env(workspace=tmp_path / "ws"))


# -- Dataset tab ---------------------------------------------------------------------------------
def test_dataset_list_roles_and_set_role(ctx):
    table, fig, roles = D.list_samples(ctx, D.ALL, D.ALL, "")
    assert list(table.columns) == D.COLUMNS and table.empty          # no samples generated yet
    assert fig.layout.title.text == "Class balance — all products"
    assert list(roles.columns) == D.ROLE_COLUMNS and len(roles)
    assert set(roles["role"]) == {"reference", "evaluation"} and "good" not in set(roles["label"])
    ref = int(roles[roles["role"] == "reference"]["id"].iloc[0])
    status, after = D.on_set_role(ctx, ref, "evaluation", "bottle")
    assert "now **evaluation**" in status
    assert after.set_index("id").loc[ref, "role"] == "evaluation"
    assert ctx.store.get_image(ref)["role"] == "evaluation"
    with pytest.raises(gr.Error, match="Give the id"):
        D.on_set_role(ctx, None, "evaluation", D.ALL)
    good = next(r["id"] for r in ctx.store.list_images(product="bottle") if r["label"] == "good")
    with pytest.raises(gr.Error, match="only real defect images have a role"):
        D.on_set_role(ctx, good, "evaluation", "bottle")


def test_dataset_import_and_export(ctx, tmp_path):
    status, choices = D.do_import(ctx, str(DEMO / "brushed_metal"), "auto", "")
    assert status.startswith("Imported (mvtec)")
    assert choices["choices"][0] == D.ALL and "brushed_metal" in choices["choices"]
    assert "brushed_metal" in ctx.store.products()
    with pytest.raises(gr.Error, match="is not a folder"):
        D.do_import(ctx, str(tmp_path / "missing"), "auto", "")
    with pytest.raises(gr.Error, match="is not a folder"):
        D.do_import(ctx, "", "auto", "")

    out = tmp_path / "export"
    status = D.do_export(ctx, str(out), "bottle", "MVTec AD")
    assert status.startswith("Exported **bottle**")
    lines = [ln for ln in (out / "bottle" / "evaluation.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    evaluation = [r for r in ctx.store.list_images(product="bottle") if r["role"] == "evaluation"]
    assert lines and len(lines) == len(evaluation)
    with pytest.raises(gr.Error, match="Give an export folder"):
        D.do_export(ctx, "", "bottle")
    with pytest.raises(gr.Error, match="Pick one product"):
        D.do_export(ctx, str(out), D.ALL)


def test_dataset_show_and_row(ctx):
    assert D.show(ctx, 0) == (None, None, None)
    with pytest.raises(gr.Error):
        D.show(ctx, 999_999)
    assert D.on_row(ctx, [5, 0], [[1, "x"]])[0] == gr.update()        # row out of range: no change


# -- jobs panel ------------------------------------------------------------------------------------
def test_job_panel_handlers(ctx):
    def refuse(*_):
        raise ValueError("bad settings")
    with pytest.raises(gr.Error, match="bad settings"):
        J.on_start(ctx, refuse, 1)
    with pytest.raises(gr.Error, match="No job is running"):
        J.on_cancel(ctx, "")
    with pytest.raises(gr.Error, match="no running job"):
        J.on_cancel(ctx, "nope")
    status, timer, *rest = J.on_tick(ctx, lambda job: (), 2, "")
    assert rest == [gr.update(), gr.update()]
    jid, status, _ = J.on_start(ctx, lambda x: ctx.jobs.submit("toy", lambda jctx, x: {"x": x}, x), 3)
    job = ctx.jobs.wait(jid, timeout=30)
    assert job["status"] == "done" and J.job_info(ctx, jid)["result"] == {"x": 3}
    status, _timer, value = J.on_tick(ctx, lambda job: (job["result"]["x"],), 1, jid)
    assert "— done" in status and value == 3


# -- PatchCore tab -----------------------------------------------------------------------------------
SINGLE = "single (normal patches only)"


def test_patchcore_start_refuses_then_runs_a_job(ctx, tmp_path):
    runlog = RunLog(ctx.settings.workspace)
    with pytest.raises(gr.Error, match="is not a folder"):
        P.start(ctx, runlog, "bottle", str(tmp_path / "missing"), SINGLE, "random", 10, 64, 0.4)
    with pytest.raises(gr.Error, match="--positives"):
        P.start(ctx, runlog, "", str(DEMO / "bottle"), "dual: + real + accepted synthetic", "random", 10, 64, 0.4)
    with pytest.raises(gr.Error, match="accepted synthetic"):
        P.start(ctx, runlog, "bottle", "", "dual: + real + accepted synthetic", "random", 10, 64, 0.4)
    with pytest.raises(gr.Error, match="Pick a product"):
        P.start(ctx, runlog, "", "", SINGLE, "random", 10, 64, 0.4)
    with pytest.raises(gr.Error, match="size"):
        P.start(ctx, runlog, "bottle", "", SINGLE, "random", 10, 8, 0.4)

    jid = P.start(ctx, runlog, "", str(DEMO / "bottle"), SINGLE, "random", 10, 64, 0.4)
    job = ctx.jobs.wait(jid, timeout=120)
    assert job["status"] == "done", job["error"]
    assert {"image_auroc", "pixel_auroc"} <= set(job["result"]["metrics"])
    table, fig, items, runs = P.live(runlog, job)
    assert dict(table)["image_auroc"] == round(job["result"]["metrics"]["image_auroc"], 4)
    assert items and Path(items[0][0]).is_file()
    assert runs.iloc[0]["id"] == job["result"]["run_id"] and runs.iloc[0]["status"] == "done"
    assert runs.iloc[0]["backbone"] == "random"
