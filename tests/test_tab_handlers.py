"""Dataset, PatchCore, DDPM and Training tab handlers called directly with a context built on a
temporary workspace (no server): happy paths and the refusals a user sees as ``gr.Error``."""
from __future__ import annotations

import shutil
import time
import sys
from pathlib import Path

import gradio as gr
import pytest

from studio.config import Settings
from studio.context import StudioContext
from studio.runs import RunLog
from studio.ui import dataset_tab as D
from studio.ui import ddpm_tab as DD
from studio.ui import jobs_panel as J
from studio.ui import patchcore_tab as P
from studio.ui import training_runs as TR
from studio.ui import training_tab as T

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
        P.start(ctx, runlog, "bottle", str(tmp_path / "missing"), SINGLE, "random", 10, 64)
    with pytest.raises(gr.Error, match="--positives"):
        P.start(ctx, runlog, "", str(DEMO / "bottle"), "dual: + real + accepted synthetic", "random", 10, 64)
    with pytest.raises(gr.Error, match="accepted synthetic"):
        P.start(ctx, runlog, "bottle", "", "dual: + real + accepted synthetic", "random", 10, 64)
    with pytest.raises(gr.Error, match="Pick a product"):
        P.start(ctx, runlog, "", "", SINGLE, "random", 10, 64)
    with pytest.raises(gr.Error, match="size"):
        P.start(ctx, runlog, "bottle", "", SINGLE, "random", 10, 8)

    jid = P.start(ctx, runlog, "", str(DEMO / "bottle"), SINGLE, "random", 10, 64)
    job = ctx.jobs.wait(jid, timeout=120)
    assert job["status"] == "done", job["error"]
    assert {"image_auroc", "pixel_auroc"} <= set(job["result"]["metrics"])
    table, fig, items, runs = P.live(runlog, job)
    assert dict(table)["image_auroc"] == round(job["result"]["metrics"]["image_auroc"], 4)
    assert items and Path(items[0][0]).is_file()
    assert runs.iloc[0]["id"] == job["result"]["run_id"] and runs.iloc[0]["status"] == "done"
    assert runs.iloc[0]["backbone"] == "random"


# -- DDPM tab --------------------------------------------------------------------------------------
def test_ddpm_checkpoints_images_and_refusals(ctx, tmp_path):
    ckpt, eval_ckpt = DD.refresh_checkpoints(ctx)
    assert ckpt["choices"] == [] and ckpt["value"] is None and eval_ckpt == ckpt
    fake = DD.models_root(ctx) / "ddpm-x"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    ckpt, _ = DD.refresh_checkpoints(ctx)
    assert ckpt["choices"] == [str(fake)] and ckpt["value"] == str(fake)

    images = DD.test_images(ctx, "bottle")
    tests = [r["id"] for r in ctx.store.list_images(product="bottle", split="test")]
    assert [v for _, v in images["choices"]] == tests and images["value"] == tests[0]
    assert DD.test_images(ctx, None)["choices"] == []

    with pytest.raises(gr.Error, match="Pick a checkpoint"):
        DD.do_inspect(ctx, "", tests[0], 50, "as trained", 0)
    with pytest.raises(gr.Error, match="Pick a test image"):
        DD.do_inspect(ctx, str(fake), None, 50, "as trained", 0)
    with pytest.raises(gr.Error):                                       # not a real checkpoint
        DD.do_inspect(ctx, str(fake), tests[0], 50, "as trained", 0)

    state = DD.DDPMState.of(ctx)
    assert state.live_models is not DD.DDPMState.of(ctx).live_models   # per app, never shared
    with pytest.raises(gr.Error, match="Pick a checkpoint"):
        DD.start_eval(ctx, state, "bottle", "", "", "50", "as trained", "color")
    with pytest.raises(gr.Error, match="integers"):
        DD.start_eval(ctx, state, "bottle", "", str(fake), "deep", "as trained", "color")
    with pytest.raises(gr.Error, match="is not a folder"):
        DD.start_eval(ctx, state, "", str(tmp_path / "missing"), str(fake), "50", "as trained", "color")
    with pytest.raises(gr.Error, match="Pick a product"):
        DD.start_train(ctx, state, "", "", "", "gaussian", 5, 0, 64, 32, "tiny", 200, True, False)
    with pytest.raises(gr.Error, match="crop 128"):
        DD.start_train(ctx, state, "bottle", "", "", "gaussian", 5, 0, 64, 128, "tiny", 200, True, False)
    assert DD.compare_frame(state).empty and list(DD.compare_frame(state).columns) == DD.EVAL_COLS


def test_ddpm_train_job_records_the_run(ctx, monkeypatch):
    """The background job (train_ddpm stubbed: fast) records the run, feeds the live loss curve
    from the per-app state, and a cancel that stopped cleanly is recorded as cancelled."""
    state = DD.DDPMState.of(ctx)
    seen = {}

    def fake_train(req, progress, cancelled, on_model):
        on_model(type("Insp", (), {"losses": [(1, 0.5), (2, 0.25)]})())
        seen["live"] = DD.live_train(state, {"id": next(iter(state.live_models)), "status": "running"})
        progress(0.5, "half")
        stopped = "cancelled" if req.steps == 1 else "steps"
        return {"checkpoint": req.out, "step": req.steps, "steps_this_run": req.steps, "seconds": 0.1,
                "loss": 0.25, "stopped": stopped, "losses": [(1, 0.5), (2, 0.25)], "parameters": 10}
    monkeypatch.setattr(DD, "train_ddpm", fake_train)
    jid = DD.start_train(ctx, state, "", str(DEMO / "bottle"), "tiny-h", "gaussian", 5, 2, 64, 32, "tiny", 200,
                         True, False)
    job = ctx.jobs.wait(jid, timeout=30)
    assert job["status"] == "done", job["error"]
    assert job["request"]["out"] == str(DD.models_root(ctx) / "tiny-h") and job["request"]["steps"] == 2
    fig, info = seen["live"]
    assert "step 2" in fig.layout.title.text and info == gr.update()
    fig, info = DD.live_train(state, job)
    assert info["step"] == 2 and info["stopped"] == "steps" and jid not in state.live_models
    run = state.runlog.list("ddpm-train")[0]
    assert run["status"] == "done" and run["job_id"] == jid and run["product"] == "bottle"
    assert run["metrics"] == {"step": 2, "loss": 0.25}

    jid = DD.start_train(ctx, state, "bottle", "", "", "gaussian", 5, 1, 64, 32, "tiny", 200, True, True)
    job = ctx.jobs.wait(jid, timeout=30)
    assert job["status"] == "done" and state.runlog.list("ddpm-train")[0]["status"] == "cancelled"
    assert "cancelled at step 1" in job["log"] and job["request"]["out"].endswith("ddpm-bottle")


# -- Training tab ------------------------------------------------------------------------------------
PIXEL = "pixel-inpaint (offline, trains from scratch)"


def test_training_refusals_and_command(ctx):
    types = T.on_product(ctx, "bottle")
    assert "broken_large" in types["choices"] and "good" not in types["choices"] and types["value"] == []
    assert T.on_product(ctx, None)["choices"] == []
    with pytest.raises(gr.Error, match="Pick a product"):
        T.train_command(ctx, PIXEL, "", [], "real only", "", "", 15, 0, 4, 0, True)
    with pytest.raises(gr.Error, match="No accepted synthetic samples for 'bottle'; choose 'real only'"):
        T.start(ctx, T.TrainingState.of(ctx), PIXEL, "bottle", [], "real + accepted synthetic", "", "x", 15, 2,
                4, 0, True)
    with pytest.raises(gr.Error, match="no defect samples of type 'scratch'"):   # checked before it starts
        T.train_command(ctx, PIXEL, "bottle", ["scratch"], "real only", "", "", 15, 3, 4, 1e-4, False)
    run = T.train_command(ctx, PIXEL, "bottle", ["broken_small", "contamination"], "real only", "", "", 15, 3, 4,
                          1e-4, False)
    assert run.plan.startswith("Training on ") and "(0 evaluation images)" in run.plan
    assert run.kind == "pixel-inpaint" and run.out == T.adapters_root(ctx) / "pixel-inpaint-bottle"
    assert (run.data / "train" / "good").is_dir()                      # the product was exported
    cmd = " ".join(run.cmd)
    assert "--damage-types broken_small,contamination" in cmd and "--steps 3" in cmd and "--no-resume" in cmd
    assert "--lr 0.0001" in cmd and "--rank" not in cmd and "--minutes" not in cmd
    sd = str(ctx.settings.workspace / "sd")     # a model folder inside the data roots (studio.paths)
    lora = T.train_command(ctx, "LoRA + damage embedding (SD 1.5 inpainting folder)", "bottle", [], "real only",
                           sd, "mine", 2.5, 0, 8, 0, True)
    assert lora.out.name == "mine" and lora.cmd[-6:] == ["--minutes", "2.5", "--rank", "8", "--model", sd]
    assert T.list_adapters(ctx) == []
    assert T.live(ctx, T.TrainingState.of(ctx), {"id": "x", "result": None}) == (gr.update(),) * 3


def test_training_job_runs_the_trainer_process(ctx):
    """The background job forwards the trainer's PROGRESS lines, records the run and returns its
    JSON summary; a failing trainer fails the job with its last error line (a stub process: fast)."""
    state = T.TrainingState.of(ctx)
    out = T.adapters_root(ctx) / "stub"
    script = ("import json; print('PROGRESS 0.5 half way', flush=True); print('log line'); "
              "print(json.dumps({'step': 3, 'loss': 0.1, 'stopped': 'steps'}, indent=1))")
    run = TR.TrainCommand([sys.executable, "-c", script], "pixel-inpaint", "bottle", DEMO / "bottle", out)
    jid = ctx.jobs.submit("train", TR.train_job, run, state)
    job = ctx.jobs.wait(jid, timeout=60)
    assert job["status"] == "done", job["error"]
    assert job["result"] == {"step": 3, "loss": 0.1, "stopped": "steps", "out": str(out)}
    assert state.procs[jid] == {"out": out}
    rec = state.runlog.list("train-pixel-inpaint")[0]
    assert rec["status"] == "done" and rec["metrics"] == {"step": 3, "loss": 0.1}

    bad = TR.TrainCommand([sys.executable, "-c", "import sys; sys.exit('trainer says no')"], "lora", "bottle",
                         DEMO / "bottle", out)
    job = ctx.jobs.wait(ctx.jobs.submit("train", TR.train_job, bad, state), timeout=60)
    assert job["status"] == "failed" and "trainer says no" in job["error"]
    assert state.runlog.list("train-lora")[0]["status"] == "failed"


# -- first-start examples ---------------------------------------------------------------------------
def test_examples_fill_the_patchcore_and_ddpm_panels_once(ctx):
    """A fresh workspace queues example PatchCore / DDPM runs; each tab's job panel shows them on
    page load (tiny budgets here); a second start finds them cached and queues nothing."""
    from studio.examples import ExamplePlan, pending, start_examples
    idle = J.on_attach(ctx, ("patchcore",), lambda job: (), 0, "press Run")
    assert idle[0] is None and idle[1] == "press Run"
    plan = ExamplePlan(patchcore_size=128, ddpm_minutes=None, ddpm_steps=2, ddpm_preset="tiny", ddpm_eval_size=64)
    ids = start_examples(ctx, ["bottle"], plan)
    assert len(ids) == 2                                  # PatchCore + DDPM training (evaluation chained)
    for jid in ids:
        assert ctx.jobs.wait(jid, timeout=300)["status"] == "done"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not [j for j in ctx.jobs.list("ddpm-eval") if j["status"] == "done"]:
        time.sleep(0.5)
    assert pending(ctx, ["bottle"]) == [] and start_examples(ctx, ["bottle"], plan) == []

    runlog = RunLog(ctx.settings.workspace)
    jid, status, _timer, table, fig, items, runs = J.on_attach(ctx, ("patchcore",), lambda j: P.live(runlog, j),
                                                                4, "idle")
    assert "patchcore** — done" in status and dict(table)["image_auroc"] > 0.5 and len(fig.data) and items
    assert len(runs) == 1
    state = DD.DDPMState.of(ctx)
    _, status, _timer, table, fig, items, compare = J.on_attach(ctx, ("ddpm-eval",),
                                                                lambda j: DD.live_eval(state, j), 4, "idle")
    assert "ddpm-eval** — done" in status and "image_auroc" in dict(table) and len(compare) == 1


# -- a job the server was running when it died: shown as interrupted, resumed / rerun once ---------
def _crashed_job(ctx, kind: str, request: dict) -> str:
    """A job row as a server killed with -9 leaves it (running, its process gone); then the
    restarted server's job manager."""
    import json
    import sqlite3
    import subprocess
    from studio.jobs import process_owner
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = process_owner(proc.pid)
    proc.kill()
    proc.wait()
    ctx.settings.workspace.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(ctx.settings.workspace / "jobs.db") as db:
        db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT, status TEXT, progress REAL, "
                   "message TEXT, request TEXT, result TEXT, error TEXT, log TEXT, created_at REAL, "
                   "started_at REAL, finished_at REAL, owner TEXT)")
        db.execute("INSERT INTO jobs (id, kind, status, progress, message, request, created_at, owner) "
                   "VALUES ('crashed', ?, 'running', 0.4, 'step 8', ?, ?, ?)",
                   (kind, json.dumps(request), time.time(), owner))
    return "crashed"


def test_interrupted_training_resumes_from_its_last_checkpoint(ctx, monkeypatch):
    state = T.TrainingState.of(ctx)
    run = T.train_command(ctx, PIXEL, "bottle", ["broken_small"], "real only", "", "", 15, 40, 4, 0, False)
    assert run.cmd[run.cmd.index("--checkpoint-every") + 1] == "8"        # a fifth of the steps
    out = run.out
    (out / "checkpoints" / "step-0000016").mkdir(parents=True)
    (out / "latest").write_text("step-0000016")
    jid = _crashed_job(ctx, "train", {"cmd": run.cmd, "kind": run.kind, "product": run.product,
                                      "data": str(run.data), "out": str(out), "plan": run.plan})
    job = ctx.jobs.get(jid)
    assert ctx.jobs.recovered == [jid] and job["status"] == "interrupted"
    line = J.describe(job)
    assert "— interrupted: the studio process" in line and "press Resume" in line and run.plan in line
    started = []

    def submit(ctx_, state_, kind, r):            # the trainer itself is not run here
        started.append((kind, r))
        return ctx.jobs.submit(kind, lambda jctx: {"out": str(r.out)}, request={"cmd": r.cmd})
    monkeypatch.setattr(TR, "submit_run", submit)
    resume = J.bind(TR.resume_run, ctx, state, "train")
    new, status, _timer = J.on_rerun(ctx, resume, jid)
    (kind, again), = started
    assert kind == "train" and again.out == out and again.kind == "pixel-inpaint" and again.product == "bottle"
    assert "--no-resume" not in again.cmd and again.cmd[0] == sys.executable
    assert [c for c in run.cmd if c != "--no-resume"][1:] == again.cmd[1:]
    assert again.plan.endswith("Resuming step-0000016.") and ctx.jobs.wait(new, 10)["status"] == "done"
    assert "started again as job " + new in J.describe(ctx.jobs.get(jid))
    with pytest.raises(gr.Error, match="started again already"):
        J.on_rerun(ctx, resume, jid)
    with pytest.raises(gr.Error, match="Only an interrupted job"):
        J.on_rerun(ctx, resume, new)
    with pytest.raises(gr.Error, match="No interrupted job"):
        J.on_rerun(ctx, resume, "")
    with pytest.raises(ValueError, match="no trainer command"):
        TR.resume_run(ctx, state, "train", {"cmd": ["/bin/sh", "-c", "echo hi"], "out": str(out)})
    assert "--checkpoint-every" not in T.train_command(ctx, PIXEL, "bottle", [], "real only", "", "", 15, 0, 4, 0,
                                                       True).cmd                  # a time budget: the default


def test_interrupted_experiment_reruns_the_same_request(ctx, monkeypatch):
    from dataclasses import asdict
    from studio.curation import CurationDB
    from studio.experiment import ExperimentRequest
    from studio.ui import curation_tab as C
    t = C.CurationState(ctx, CurationDB(ctx.settings.workspace), RunLog(ctx.settings.workspace))
    export = ctx.settings.workspace / "exports" / "bottle-x"
    ctx.store.export_mvtec(export, "bottle")
    req = ExperimentRequest(data=str(export / "bottle"), out=str(ctx.settings.workspace / "runs" / "exp-x"),
                            generate=["perlin"], repeats=1, per_type=2)
    jid = _crashed_job(ctx, "experiment", asdict(req))
    assert "press Rerun" in J.describe(ctx.jobs.get(jid))
    seen = []
    monkeypatch.setattr(C, "run_experiment", lambda r, progress, cancelled: seen.append(r) or {"verdict": "x"})
    new, _status, _timer = J.on_rerun(ctx, J.bind(C.rerun_experiment, t), jid)
    job = ctx.jobs.wait(new, 30)
    assert job["status"] == "done" and seen == [req] and job["result"]["out"] == req.out
    assert t.runlog.get(job["result"]["run_id"])["status"] == "done"
    with pytest.raises(ValueError, match="data .* is gone"):
        C.rerun_experiment(t, {**asdict(req), "data": str(ctx.settings.workspace / "gone" / "bottle")})
