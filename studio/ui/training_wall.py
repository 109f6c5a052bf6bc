"""Training tab, wall colour: a wall-colour LoRA (zero-prompt SD inpainting, :mod:`pipelines.wall_train`)
from a folder of photos + wall masks. Rendered by :mod:`studio.ui.training_tab` inside its tab; the
run is ``python -m studio train --kind wall …`` in its own process (the same job function, run log
and cancel file as the other trainers). Shows the loss, the latest validation grid (crop, mask,
reference, depth proxy, outputs) and the colour metrics per validation step with their grades
(step 0 = the untrained baseline).
"""
from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from pipelines.training.trainers import TRAINERS
from studio.context import StudioContext
from studio.ui.checks import optional_path, run_folder, server_path
from studio.ui.jobs_panel import JobPanel, bind
from studio.ui.training_runs import TrainCommand, adapters_root, resume_run, run_views, submit_run

REFERENCES = {"auto (IP-Adapter when its weights are found)": "auto",
              "IP-Adapter (required)": "ip-adapter", "none (unconditional)": "none"}
KIND = TRAINERS["wall"].kind
METRIC_HEADERS = ["step", "LAB distance", "hue error °", "ΔE2000", "grade", "good share"]


def wall_command(ctx: StudioContext, folder, masks, model, name, minutes, steps, rank, prob, reference,
                 method, color_loss, colors, resume):
    """The trainer's command line from the widget values; bad input → ``gr.Error`` with the fix."""
    from pipelines.color import as_rgb
    from pipelines.training import TrainDataError
    from pipelines.wall_train import wall_samples_from_folder
    folder = (folder or "").strip()
    if not folder:
        raise gr.Error("Give the folder of wall photos (images/ + masks/, or photo + <name>_mask.png)")
    folder = str(server_path(ctx, folder, "wall photos folder", must_exist=False))  # the reader says what is missing
    masks = optional_path(ctx, masks, "masks folder", must_exist=False)
    model = optional_path(ctx, model, "SD 1.5 inpainting folder", must_exist=False)
    out = run_folder(adapters_root(ctx), name, f"wall-{Path(folder).name}")
    try:
        samples = wall_samples_from_folder(folder, masks or None)
    except TrainDataError as exc:
        raise gr.Error(str(exc)) from exc
    n = len(samples)
    _guard_wall_photos(ctx, Path(folder), samples)
    for c in [c.strip() for c in (colors or "").split(",") if c.strip()]:
        try:
            as_rgb(c)
        except ValueError as exc:
            raise gr.Error(f"Validation colours: {exc}") from exc
    if not 0.0 <= float(prob or 0) <= 1.0:
        raise gr.Error("Random-colour probability must be between 0 and 1")
    cmd = [sys.executable, "-m", "studio", "train", "--kind", KIND, "--data", folder, "--out", str(out),
           "--progress-lines", "--quiet", "--cancel-file", str(out / "CANCEL"),
           "--rank", str(int(rank)), "--random-color-prob", str(float(prob)),
           "--reference", REFERENCES.get(reference, reference), "--color-method", method,
           "--color-loss-weight", str(float(color_loss or 0))]
    cmd += ["--steps", str(int(steps))] if steps else ["--minutes", str(float(minutes or 15))]
    if (masks or "").strip():
        cmd += ["--masks", masks.strip()]
    if (model or "").strip():
        cmd += ["--model", model.strip()]
    if (colors or "").strip():
        cmd += ["--validation-colors", colors.strip()]
    if not resume:
        cmd += ["--no-resume"]
    return TrainCommand(cmd, KIND, f"wall ({n} photos)", Path(folder), out)


def _guard_wall_photos(ctx: StudioContext, folder: Path, samples: list) -> None:
    """The wall photos have no product of their own: none may be a copy of an image any product
    in the dataset scores (:func:`pipelines.guard.guard` against each product's scored set)."""
    from pipelines.guard import guard, list_images
    from pipelines.roles import LeakageError
    from studio.services import scored_set
    img_dir = folder / "images" if (folder / "images").is_dir() else folder
    photos = [p for p in list_images(img_dir) if not p.stem.endswith("_mask")]
    names = [str(p) for p in photos] if len(photos) == len(samples) else [f"{folder} photo {i}" for i in range(len(samples))]
    for product in ctx.store.products():
        try:
            guard(zip(names, (s.image for s in samples)), scored_set(ctx.store, product),
                  f"wall training data (product {product})")
        except LeakageError as exc:
            raise gr.Error(str(exc)) from exc


def start_wall(ctx: StudioContext, state, *values) -> str:
    """Train a wall-colour LoRA in its own process as a background job (a second start resumes)."""
    return submit_run(ctx, state, "train-wall", wall_command(ctx, *values))


def metric_rows(run_dir: Path) -> list[list]:
    """The run's colour metrics per validation step (step 0: the untrained baseline)."""
    from pipelines.wall_train import read_metrics
    return [[r["step"], r["lab_distance"], r["hue_error_deg"], r["delta_e2000"],
             r["grade"] + (" (untrained)" if r.get("baseline") else ""), r["good_share"]]
            for r in read_metrics(run_dir)]


def live_wall(ctx: StudioContext, state, job_row: dict) -> tuple:
    """Each timer tick: (loss figure, latest validation grid, colour metrics table)."""
    v = run_views(state, job_row)
    if v is None:
        return gr.update(), gr.update(), gr.update()
    return v[0], v[1], metric_rows(v[2])


def build(ctx: StudioContext, state) -> None:
    """The wall-colour block (inside the Training tab's Blocks); ``state`` is the tab's TrainingState."""
    with gr.Accordion("Wall colour LoRA — from a folder of photos + masks", open=False):
        gr.Markdown("Trains the `wall` backend's LoRA: zero prompt, the target colour as an IP-Adapter "
                    "reference (when its weights are found), 30 % of samples recoloured to a random "
                    "colour, masks eroded by 5 px. Validation grades the raw output's colour "
                    "(good: LAB distance < 15, hue error < 10°, ΔE < 10; excellent: < 5, < 3°, < 3); "
                    "step 0 is the untrained baseline. Needs an SD 1.5 inpainting folder; ~1 s/step on a GPU.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                w = {}
                w["folder"] = gr.Textbox("", label="Photos folder (images/ + masks/, or <name>_mask.png beside)",
                                         elem_id="trw-folder")
                w["masks"] = gr.Textbox("", label="Masks folder (optional)")
                w["model"] = gr.Textbox("", label="SD 1.5 inpainting folder (default $DEFECT_STUDIO_SD_INPAINT)")
                w["name"] = gr.Textbox("", label="Run name (default wall-<folder>)")
                with gr.Row():
                    w["minutes"] = gr.Number(15, label="Minutes")
                    w["steps"] = gr.Number(0, label="…or steps (0 = time)", precision=0)
                w["rank"] = gr.Slider(1, 64, 4, step=1, label="LoRA rank")
                w["prob"] = gr.Slider(0, 1, 0.3, step=0.05, label="Random-colour probability")
                w["reference"] = gr.Dropdown(list(REFERENCES), value=list(REFERENCES)[0], label="Colour reference")
                w["method"] = gr.Radio(["median", "mean", "kmeans"], value="median", label="Dominant colour")
                w["color_loss"] = gr.Number(0, label="Colour-consistency loss weight (0 = off)")
                w["colors"] = gr.Textbox("", label="Validation colours (#RRGGBB, comma-separated; default each wall's own)")
                w["resume"] = gr.Checkbox(True, label="Resume the run's last checkpoint")
                panel = JobPanel(ctx, "Train wall colour", "train_wall", rerun_label="Resume interrupted run",
                                 idle="No wall run yet — give a photos folder and press **Train wall colour** "
                                      "(about 15 min by default).")
            with gr.Column(scale=2):
                loss = gr.Plot(None, label="Loss")
                grid = gr.Image(label="Latest validation grid (crop, mask, reference, depth proxy, outputs)",
                                format="png", interactive=False)
                metrics = gr.Dataframe([], headers=METRIC_HEADERS, label="Colour metrics per validation step",
                                       interactive=False, elem_id="trw-metrics")
        panel.wire(bind(start_wall, ctx, state),
                   [w[k] for k in ("folder", "masks", "model", "name", "minutes", "steps", "rank", "prob",
                                   "reference", "method", "color_loss", "colors", "resume")],
                   bind(live_wall, ctx, state), [loss, grid, metrics],
                   rerun=bind(resume_run, ctx, state, "train-wall"))
