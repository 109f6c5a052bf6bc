"""Training tab: LoRA + damage-type embeddings for an SD 1.5 inpainting folder, or the offline
pixel-inpaint model. Each run is a separate process (`python -m studio train …`), so the UI stays
responsive; progress comes from its output, the loss curve from its history file, cancel asks it
to stop cleanly (it keeps its last checkpoint) and a second start resumes.

Handlers are module-level functions taking the context first (testable without a server); the
tab's per-app state (run log, output folder of each running job) is a :class:`TrainingState`
made in ``build``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from studio.config import ROOT
from studio.context import StudioContext
from studio.jobs import JobCancelled
from studio.runs import RunLog
from studio.ui.ddpm_tab import loss_figure
from studio.ui.jobs_panel import JobPanel, bind

KINDS = {"pixel-inpaint (offline, trains from scratch)": "pixel-inpaint",
         "LoRA + damage embedding (SD 1.5 inpainting folder)": "lora"}


def trained_adapters(root: Path) -> list[list]:
    rows = []
    for out in sorted(p for p in root.glob("*") if (p / "checkpoints").is_dir()):
        ckpts = sorted((out / "checkpoints").glob("step-*"))
        if not ckpts:
            continue
        latest = ckpts[-1]
        st = latest / "trainer_state.json"
        kind = "controlnet" if st.is_file() and '"kind": "controlnet"' in st.read_text() else None
        rows.append([out.name, kind or ("lora" if any(latest.glob("pytorch_lora_weights*.safetensors")) else "pixel-inpaint"),
                     latest.name, str(latest)])
    return rows


def adapters_root(ctx: StudioContext) -> Path:
    return ctx.settings.workspace / "adapters"


@dataclass
class TrainingState:
    """Per-app state of the tab, made by ``build`` (never module-level: two apps share nothing):
    the run log and each running job's output folder (job id → {"out": folder})."""
    runlog: RunLog
    procs: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: StudioContext) -> "TrainingState":
        return cls(RunLog(ctx.settings.workspace))


@dataclass
class TrainCommand:
    """One trainer run: ``python -m studio train …`` on an export of the product."""
    cmd: list[str]
    kind: str          # "pixel-inpaint" | "lora"
    product: str
    data: Path         # the exported category folder
    out: Path          # the run folder (checkpoints, history, CANCEL file)
    plan: str = ""     # what it trains on ("Training on 4 reference defect(s) + 2 accepted …")


# -- handlers: module level, each takes the context first ---------------------------------------
def on_product(ctx: StudioContext, p):
    choices = [t for t in ctx.catalog().damage_types(p) if t != "good"] if p else []
    return gr.update(choices=choices, value=[])


def train_command(ctx: StudioContext, k, p, tps, dat, mdl, nm, mins, st, rk, rate, res) -> TrainCommand:
    """The trainer's command line from the widget values (the product is exported first); refusals
    are ``gr.Error`` with the reason."""
    kind_id = KINDS[k]
    if not p:
        raise gr.Error("Pick a product")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    export = ctx.settings.workspace / "exports" / f"{p}-{stamp}"
    ctx.store.export_mvtec(export, p)
    cat = export / p
    out = adapters_root(ctx) / (nm.strip() or f"{kind_id}-{p}")
    cmd = [sys.executable, "-m", "studio", "train", "--kind", kind_id, "--data", str(cat), "--out", str(out),
           "--progress-lines", "--quiet", "--cancel-file", str(out / "CANCEL")]
    if tps:
        cmd += ["--damage-types", ",".join(tps)]
    extra = None
    if dat.startswith("real +"):
        if not (cat / "synthetic").is_dir():
            raise gr.Error(f"No accepted synthetic samples for {p!r}; choose 'real only'")
        extra = cat
        cmd += ["--extra-data", str(cat)]       # the trainer reads only its synthetic/ (+ provenance)
    plan = data_plan(cat, list(tps or []) or None, extra, f"{kind_id} training data")
    cmd += ["--steps", str(int(st))] if st else ["--minutes", str(float(mins or 15))]
    if kind_id == "lora":
        cmd += ["--rank", str(int(rk))] + (["--model", mdl] if mdl else [])
    if rate:
        cmd += ["--lr", str(float(rate))]
    if not res:
        cmd += ["--no-resume"]
    return TrainCommand(cmd, kind_id, p, cat, out, plan)


def data_plan(cat: Path, types: list | None, extra: Path | None, purpose: str) -> str:
    """What the run will train on, checked before it starts: the export's reference defects (+ the
    accepted synthetic samples of ``extra``) through the one guard (:func:`pipelines.training.training_data`);
    a copy of a scored image or missing samples → ``gr.Error`` naming the file."""
    from pipelines.roles import LeakageError
    from pipelines.training import TrainDataError, training_data
    from pipelines.training_data import training_manifest
    try:
        data = training_data(cat, types, extra, None, purpose)    # the guard, naming each file
        training_manifest(cat, types, extra)               # provenance: descends from a scored image?
    except (LeakageError, TrainDataError) as exc:
        raise gr.Error(str(exc)) from exc
    c = data.counts
    return (f"Training on {c['reference']} reference defect(s)"
            + (f" + {c['synthetic']} accepted synthetic sample(s)" if extra is not None else "")
            + f" ({c['evaluation']} evaluation images).")


def start(ctx: StudioContext, state: TrainingState, k, p, tps, dat, mdl, nm, mins, st, rk, rate, res) -> str:
    """Train a model in its own process as a background job (a second start resumes)."""
    run = train_command(ctx, k, p, tps, dat, mdl, nm, mins, st, rk, rate, res)
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "CANCEL").unlink(missing_ok=True)
    return ctx.jobs.submit("train", train_job, run, state, request={"cmd": run.cmd, "plan": run.plan})


def train_job(jctx, run: TrainCommand, state: TrainingState) -> dict:
    """The background job: run the trainer process, forward its PROGRESS lines (a cancel touches
    the CANCEL file: it stops cleanly and saves), record the run, return its JSON summary."""
    cmd, out = run.cmd, run.out
    run_id = state.runlog.start(f"train-{run.kind}", run.product, str(run.data), {"cmd": cmd, "plan": run.plan},
                                str(out), jctx.job_id)
    if run.plan:
        jctx.progress(0.0, run.plan)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state.procs[jctx.job_id] = {"out": out}
    tail = []
    for line in proc.stdout:
        if line.startswith("PROGRESS "):
            _, frac, *msg = line.rstrip("\n").split(" ", 2)
            try:
                jctx.progress(float(frac), msg[0] if msg else "")
            except JobCancelled:
                (out / "CANCEL").touch()  # the trainer stops cleanly and saves
        else:
            tail.append(line)
    err = proc.stderr.read()
    code = proc.wait()
    if code != 0:
        state.runlog.finish(run_id, status="failed", error=err[-2000:])
        raise RuntimeError((err.strip().splitlines() or [f"exit code {code}"])[-1])
    summary = json.loads("".join(tail[tail.index(next(t for t in tail if t.startswith("{"))):]))
    state.runlog.finish(run_id, {k: summary[k] for k in ("step", "loss")},
                        status="cancelled" if summary["stopped"] == "cancelled" else "done")
    return {**summary, "out": str(out)}


def run_views(state: TrainingState, job: dict) -> tuple | None:
    """A training job's live views, shared by every trainer panel of the tab: (loss figure, latest
    validation grid or no update, run folder); None while the job has no run folder yet."""
    from pipelines.training import read_history
    info = state.procs.get(job["id"])
    out = Path(info["out"]) if info else (Path(job["result"]["out"]) if job.get("result") else None)
    if out is None:
        return None
    hist = read_history(out)
    grids = sorted(out.glob("validation/*.png"))
    return (loss_figure(hist, f"{out.name} — step {hist[-1][0] if hist else 0}"),
            str(grids[-1]) if grids else gr.update(), out)


def live(ctx: StudioContext, state: TrainingState, job: dict) -> tuple:
    """Each timer tick: (loss figure, latest validation grid, trained models table)."""
    v = run_views(state, job)
    if v is None:
        return gr.update(), gr.update(), gr.update()
    return v[0], v[1], trained_adapters(adapters_root(ctx))


def list_adapters(ctx: StudioContext) -> list[list]:
    return trained_adapters(adapters_root(ctx))


# -- layout and wiring ---------------------------------------------------------------------------
def _settings(ctx: StudioContext) -> dict:
    w: dict = {}
    products = ctx.store.products()
    w["kind"] = gr.Radio(list(KINDS), value=list(KINDS)[0], label="Model", elem_id="tr-kind")
    w["product"] = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                               elem_id="tr-product")
    w["types"] = gr.CheckboxGroup([], label="Damage types (none ticked = all with samples)",
                                  elem_id="tr-types")
    w["data"] = gr.Radio(["real only", "real + accepted synthetic"], value="real only", label="Data")
    w["model"] = gr.Textbox("", label="SD 1.5 inpainting folder (LoRA only; default $DEFECT_STUDIO_SD_INPAINT)")
    w["name"] = gr.Textbox("", label="Run name (default <kind>-<product>)", elem_id="tr-name")
    with gr.Row():
        w["minutes"] = gr.Number(15, label="Minutes", elem_id="tr-minutes")
        w["steps"] = gr.Number(0, label="…or steps (0 = time)", precision=0, elem_id="tr-steps")
    with gr.Row():
        w["rank"] = gr.Slider(1, 64, 4, step=1, label="LoRA rank")
        w["lr"] = gr.Number(0, label="Learning rate (0 = default)")
    w["resume"] = gr.Checkbox(True, label="Resume the run's last checkpoint", elem_id="tr-resume")
    w["panel"] = JobPanel(ctx, "Train", "train")
    return w


def _results(ctx: StudioContext) -> dict:
    w: dict = {}
    w["loss"] = gr.Plot(None, label="Loss", elem_id="tr-loss")
    w["grid"] = gr.Image(label="Latest validation grid", format="png", interactive=False)
    w["adapters"] = gr.Dataframe(list_adapters(ctx), headers=["run", "kind", "latest", "folder"],
                                 label="Trained models (use the folder as 'model' / 'lora' in Annotate)",
                                 interactive=False, elem_id="tr-adapters")
    return w


def build(ctx: StudioContext) -> list:
    """Render the tab inside the current Blocks and wire it; returns the page-load refreshes."""
    state = TrainingState.of(ctx)   # per app: the run log and the running jobs' folders
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            s = _settings(ctx)
        with gr.Column(scale=2):
            r = _results(ctx)
    from studio.ui import training_wall
    training_wall.build(ctx, state)          # wall colour from a folder of photos + masks
    from studio.ui import training_controlnet
    training_controlnet.build(ctx, state)    # ControlNet on the product's defect masks
    types_for = bind(on_product, ctx)
    s["product"].change(types_for, s["product"], s["types"], api_name=False)
    s["panel"].wire(bind(start, ctx, state),
                    [s["kind"], s["product"], s["types"], s["data"], s["model"], s["name"], s["minutes"],
                     s["steps"], s["rank"], s["lr"], s["resume"]],
                    bind(live, ctx, state), [r["loss"], r["grid"], r["adapters"]])
    return [(types_for, [s["product"]], [s["types"]]), (bind(list_adapters, ctx), [], [r["adapters"]])]
