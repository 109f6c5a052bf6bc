"""A reusable start / cancel / progress panel for background jobs (PatchCore, DDPM, training).

The job runs in ``ctx.jobs`` (a thread; state persisted in jobs.db); a ``gr.Timer`` polls it once
a second while it runs, so the page stays responsive and a reload can re-attach by job id.
"""
from __future__ import annotations

from typing import Callable

import gradio as gr

from studio.context import StudioContext
from studio.jobs import FINISHED


def _bar(fraction: float, width: int = 24) -> str:
    done = int(round(fraction * width))
    return "█" * done + "░" * (width - done)


def describe(job: dict) -> str:
    line = f"**{job['kind']}** `{job['id']}` — {job['status']}"
    if job["status"] in ("running", "queued"):
        line += f"  \n`{_bar(job['progress'] or 0)}` {100 * (job['progress'] or 0):.0f}% {job['message'] or ''}"
    elif job["status"] == "failed":
        line += f": {job['error']}"
    elif job["status"] == "cancelled":
        line += " (partial results kept where the job saved them)"
    return line


class JobPanel:
    def __init__(self, ctx: StudioContext, start_label: str, prefix: str):
        self.ctx, self.prefix = ctx, prefix
        with gr.Row():
            self.start = gr.Button(start_label, variant="primary", elem_id=f"{prefix}-start")
            self.cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
        self.job_id = gr.Textbox(label="Job id", interactive=False, elem_id=f"{prefix}-job-id")
        self.status = gr.Markdown(elem_id=f"{prefix}-status")
        self.timer = gr.Timer(1.0, active=False)

    def wire(self, start_fn: Callable[..., str], inputs: list, live_fn: Callable[[dict], tuple],
             outputs: list) -> None:
        """``start_fn(*inputs) -> job id``; ``live_fn(job) -> values for outputs`` on every tick."""
        ctx = self.ctx

        def on_start(*args):
            try:
                jid = start_fn(*args)
            except ValueError as exc:
                raise gr.Error(str(exc)) from exc
            return jid, describe(ctx.jobs.get(jid)), gr.Timer(active=True)

        def on_tick(jid):
            if not jid:
                return (gr.update(), gr.Timer(active=False), *[gr.update()] * len(outputs))
            job = ctx.jobs.get(jid)
            done = job["status"] in FINISHED
            return (describe(job), gr.Timer(active=not done), *live_fn(job))

        def on_cancel(jid):
            if not jid:
                raise gr.Error("No job is running")
            try:
                ctx.jobs.cancel(jid)
            except KeyError as exc:
                raise gr.Error(str(exc)) from exc
            return "Cancelling…"

        def job_status(job_id: str) -> dict:
            """Status of a background job: status, progress, message, result, error."""
            job = ctx.jobs.get(job_id)
            return {k: job[k] for k in ("id", "kind", "status", "progress", "message", "result", "error")}

        self.start.click(on_start, inputs, [self.job_id, self.status, self.timer],
                         api_name=f"{self.prefix}_start")
        self.timer.tick(on_tick, self.job_id, [self.status, self.timer, *outputs], api_name=False,
                        show_progress="hidden")
        self.cancel.click(on_cancel, self.job_id, self.status, api_name=f"{self.prefix}_cancel")
        gr.api(job_status, api_name=f"{self.prefix}_job")
