"""Training tab: LoRA + damage-type embeddings for an SD 1.5 inpainting folder, or the offline
pixel-inpaint model. Each run is a separate process (`python -m studio train …`), so the UI stays
responsive; progress comes from its output, the loss curve from its history file, cancel asks it
to stop cleanly (it keeps its last checkpoint) and a second start resumes."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import gradio as gr

from studio.config import ROOT
from studio.context import StudioContext
from studio.jobs import JobCancelled
from studio.runs import RunLog
from studio.ui.ddpm_tab import loss_figure
from studio.ui.jobs_panel import JobPanel

KINDS = {"pixel-inpaint (offline, trains from scratch)": "pixel-inpaint",
         "LoRA + damage embedding (SD 1.5 inpainting folder)": "lora"}


def trained_adapters(root: Path) -> list[list]:
    rows = []
    for out in sorted(p for p in root.glob("*") if (p / "checkpoints").is_dir()):
        ckpts = sorted((out / "checkpoints").glob("step-*"))
        if not ckpts:
            continue
        latest = ckpts[-1]
        rows.append([out.name, "lora" if any(latest.glob("pytorch_lora_weights*.safetensors")) else "pixel-inpaint",
                     latest.name, str(latest)])
    return rows


def build(ctx: StudioContext) -> list:
    store = ctx.store
    runlog = RunLog(ctx.settings.workspace)
    root = ctx.settings.workspace / "adapters"
    products = store.products()
    procs: dict[str, dict] = {}

    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            kind = gr.Radio(list(KINDS), value=list(KINDS)[0], label="Model", elem_id="tr-kind")
            product = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                                  elem_id="tr-product")
            types = gr.CheckboxGroup([], label="Damage types (none ticked = all with samples)",
                                     elem_id="tr-types")
            data = gr.Radio(["real only", "real + accepted synthetic"], value="real only", label="Data")
            model = gr.Textbox("", label="SD 1.5 inpainting folder (LoRA only; default $DEFECT_STUDIO_SD_INPAINT)")
            name = gr.Textbox("", label="Run name (default <kind>-<product>)", elem_id="tr-name")
            with gr.Row():
                minutes = gr.Number(15, label="Minutes", elem_id="tr-minutes")
                steps = gr.Number(0, label="…or steps (0 = time)", precision=0, elem_id="tr-steps")
            with gr.Row():
                rank = gr.Slider(1, 64, 4, step=1, label="LoRA rank")
                lr = gr.Number(0, label="Learning rate (0 = default)")
            resume = gr.Checkbox(True, label="Resume the run's last checkpoint", elem_id="tr-resume")
            panel = JobPanel(ctx, "Train", "train")
        with gr.Column(scale=2):
            loss = gr.Plot(loss_figure([]), label="Loss", elem_id="tr-loss")
            grid = gr.Image(label="Latest validation grid", format="png", interactive=False)
            adapters = gr.Dataframe(trained_adapters(root), headers=["run", "kind", "latest", "folder"],
                                    label="Trained models (use the folder as 'model' / 'lora' in Annotate)",
                                    interactive=False, elem_id="tr-adapters")

    def on_product(p):
        choices = [t for t in ctx.catalog().damage_types(p) if t != "good"] if p else []
        return gr.update(choices=choices, value=[])

    def start(k, p, tps, dat, mdl, nm, mins, st, rk, rate, res):
        kind_id = KINDS[k]
        if not p:
            raise gr.Error("Pick a product")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        export = ctx.settings.workspace / "exports" / f"{p}-{stamp}"
        store.export_mvtec(export, p)
        cat = export / p
        out = root / (nm.strip() or f"{kind_id}-{p}")
        cmd = [sys.executable, "-m", "studio", "train", "--kind", kind_id, "--data", str(cat), "--out", str(out),
               "--progress-lines", "--quiet", "--cancel-file", str(out / "CANCEL")]
        if tps:
            cmd += ["--damage-types", ",".join(tps)]
        if dat.startswith("real +"):
            if not (cat / "synthetic").is_dir():
                raise gr.Error(f"No accepted synthetic samples for {p!r}; choose 'real only'")
            cmd += ["--extra-data", str(cat)]
        cmd += ["--steps", str(int(st))] if st else ["--minutes", str(float(mins or 15))]
        if kind_id == "lora":
            cmd += ["--rank", str(int(rk))] + (["--model", mdl] if mdl else [])
        if rate:
            cmd += ["--lr", str(float(rate))]
        if not res:
            cmd += ["--no-resume"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "CANCEL").unlink(missing_ok=True)

        def job(jctx, cmd):
            run_id = runlog.start(f"train-{kind_id}", p, str(cat), {"cmd": cmd}, str(out), jctx.job_id)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs[jctx.job_id] = {"out": out}
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
                runlog.finish(run_id, status="failed", error=err[-2000:])
                raise RuntimeError((err.strip().splitlines() or [f"exit code {code}"])[-1])
            import json
            summary = json.loads("".join(tail[tail.index(next(t for t in tail if t.startswith("{"))):]))
            runlog.finish(run_id, {k: summary[k] for k in ("step", "loss")},
                          status="cancelled" if summary["stopped"] == "cancelled" else "done")
            return {**summary, "out": str(out)}

        return ctx.jobs.submit("train", job, cmd, request={"cmd": cmd})

    def live(job):
        from pipelines.lora import read_history
        info = procs.get(job["id"])
        out = Path(info["out"]) if info else (Path(job["result"]["out"]) if job.get("result") else None)
        if out is None:
            return gr.update(), gr.update(), gr.update()
        hist = read_history(out)
        grids = sorted(out.glob("validation/*.png"))
        return (loss_figure(hist, f"{out.name} — step {hist[-1][0] if hist else 0}"),
                str(grids[-1]) if grids else gr.update(), trained_adapters(root))

    product.change(on_product, product, types, api_name=False)
    panel.wire(start, [kind, product, types, data, model, name, minutes, steps, rank, lr, resume], live,
               [loss, grid, adapters])
    return [(on_product, [product], [types]), (lambda: trained_adapters(root), [], [adapters])]
