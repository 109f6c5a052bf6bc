"""What every trainer panel of the Training tab shares (the tab, :mod:`studio.ui.training_wall`,
:mod:`studio.ui.training_controlnet`): a run's command (:class:`TrainCommand`), the tab's per-app
state (:class:`TrainingState`), the run folder, the data plan checked before a run starts, the
background job that runs ``python -m studio train --kind …`` (:func:`submit_run`, :func:`train_job`),
the resume of a run the server was running when it died (:func:`resume_run`) and a run's live
views. The panels import this module; it imports none of them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from studio.config import ROOT
from studio.context import StudioContext
from studio.jobs import JobCancelled
from studio.runs import RunLog
from studio.ui.ddpm_tab import loss_figure


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
    kind: str          # its TRAINERS kind (pipelines.training.trainers): "pixel-inpaint", "lora", …
    product: str
    data: Path         # the exported category folder
    out: Path          # the run folder (checkpoints, history, CANCEL file)
    plan: str = ""     # what it trains on ("Training on 4 reference defect(s) + 2 accepted …")


def on_product(ctx: StudioContext, product):
    """The product's damage types (good excluded) for a panel's type checkboxes."""
    choices = [t for t in ctx.catalog().damage_types(product) if t != "good"] if product else []
    return gr.update(choices=choices, value=[])


def data_plan(category: Path, types: list | None, extra: Path | None, purpose: str) -> str:
    """What the run will train on, checked before it starts: the export's reference defects (+ the
    accepted synthetic samples of ``extra``) through the one guard (:func:`pipelines.training.training_data`);
    a copy of a scored image or missing samples → ``gr.Error`` naming the file."""
    from pipelines.roles import LeakageError
    from pipelines.training import TrainDataError, training_data
    from pipelines.training_data import training_manifest
    try:
        data = training_data(category, types, extra, None, purpose)    # the guard, naming each file
        training_manifest(category, types, extra)               # provenance: descends from a scored image?
    except (LeakageError, TrainDataError) as exc:
        raise gr.Error(str(exc)) from exc
    c = data.counts
    return (f"Training on {c['reference']} reference defect(s)"
            + (f" + {c['synthetic']} accepted synthetic sample(s)" if extra is not None else "")
            + f" ({c['evaluation']} evaluation images).")


def submit_run(ctx: StudioContext, state: TrainingState, job_kind: str, command: TrainCommand) -> str:
    """Start ``command`` as a background job of ``job_kind`` (its folder made, a stale CANCEL file
    removed: a second start resumes)."""
    command.out.mkdir(parents=True, exist_ok=True)
    (command.out / "CANCEL").unlink(missing_ok=True)
    request = {"cmd": command.cmd, "kind": command.kind, "product": command.product, "data": str(command.data),
               "out": str(command.out), **({"plan": command.plan} if command.plan else {})}
    return ctx.jobs.submit(job_kind, train_job, command, state, request=request)


def checkpoint_flags(steps) -> list[str]:
    """A run of ``steps`` steps checkpoints at least every fifth of them (at most every 100), so a
    run the server was running when it died resumes from most of its steps."""
    return ["--checkpoint-every", str(max(1, min(100, int(steps) // 5)))] if steps else []


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def resume_run(ctx: StudioContext, state: TrainingState, job_kind: str, request: dict) -> str:
    """Start an interrupted training job again (:meth:`studio.jobs.JobManager.rerun`): the same
    trainer command, resuming the run's last checkpoint (``--no-resume`` dropped; no checkpoint yet:
    the run starts over). Only a ``python -m studio train`` command is run, with this interpreter."""
    cmd = [str(c) for c in (request.get("cmd") or [])]
    if cmd[1:4] != ["-m", "studio", "train"]:
        raise ValueError("this job has no trainer command to resume; start the run again from its panel")
    cmd = [sys.executable, *[c for c in cmd[1:] if c != "--no-resume"]]
    out = request.get("out") or _flag(cmd, "--out")
    if not out:
        raise ValueError("this job names no run folder to resume")
    data = request.get("data") or _flag(cmd, "--data") or ""
    kind = request.get("kind") or _flag(cmd, "--kind") or "pixel-inpaint"
    plan = (request.get("plan") or "").split("  \nResuming ")[0]
    run = TrainCommand(cmd, kind, request.get("product") or Path(data).name, Path(data), Path(out), plan)
    latest = run.out / "latest"
    if latest.is_file():
        run.plan = (run.plan + "  \n" if run.plan else "") + f"Resuming {latest.read_text().strip()}."
    return submit_run(ctx, state, job_kind, run)


def train_job(jctx, command: TrainCommand, state: TrainingState) -> dict:
    """The background job: run the trainer process, forward its PROGRESS lines (a cancel touches
    the CANCEL file: it stops cleanly and saves), record the run, return its JSON summary."""
    cmd, out = command.cmd, command.out
    run_id = state.runlog.start(f"train-{command.kind}", command.product, str(command.data),
                                {"cmd": cmd, "plan": command.plan}, str(out), jctx.job_id)
    if command.plan:
        jctx.progress(0.0, command.plan)
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


def run_views(state: TrainingState, job_row: dict) -> tuple | None:
    """A training job's live views, shared by every trainer panel of the tab: (loss figure, latest
    validation grid or no update, run folder); None while the job has no run folder yet."""
    from pipelines.training import read_history
    info = state.procs.get(job_row["id"])
    out = Path(info["out"]) if info else (Path(job_row["result"]["out"]) if job_row.get("result") else None)
    if out is None:
        return None
    hist = read_history(out)
    grids = sorted(out.glob("validation/*.png"))
    # the grid as pixels: the run folder (weights) is not among the paths the studio serves
    return (loss_figure(hist, f"{out.name} — step {hist[-1][0] if hist else 0}"),
            _read_png(grids[-1]) if grids else gr.update(), out)


def _read_png(path: Path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:           # being written: the next tick shows it
        return gr.update()
