"""Defect Studio — ``python app.py [--port 7860] [--host 127.0.0.1] [--workspace DIR]``.

Builds the Blocks app from one file per tab (studio/ui/). Heavy libraries and models load lazily:
the first page is served within seconds, offline, on the bundled demo data.
"""
from __future__ import annotations

import argparse

import gradio as gr

from studio.config import Settings
from studio.context import StudioContext
from studio.services import bootstrap_demo
from studio.ui import annotate, dataset_tab

TITLE = "Defect Studio"


def build_app(settings: Settings | None = None) -> gr.Blocks:
    ctx = StudioContext(settings or Settings.from_env())
    bootstrap_demo(ctx.store, ctx.settings.demo_dir)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE} — synthetic industrial defects, human in the loop  \n"
                    f"<small>workspace: `{ctx.settings.workspace}`</small>")
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                annotate.build(ctx)
            with gr.Tab("Dataset", id="dataset") as ds_tab:
                ds = dataset_tab.build(ctx)
        fn, inputs, outputs = ds["refresh"]
        ds_tab.select(fn, inputs, outputs, api_name=False)
        demo.load(fn, inputs, outputs, api_name=False)
    demo.studio_context = ctx  # for tests and embedding
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Defect Studio web app")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--workspace", help="workspace folder (default $DEFECT_STUDIO_WORKSPACE or ./workspace)")
    args = p.parse_args(argv)
    settings = Settings.from_env(host=args.host, port=args.port, workspace=args.workspace)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=2).launch(
        server_name=settings.host, server_port=settings.port, auth=settings.auth,
        max_file_size=f"{settings.max_upload_mb:g}mb", show_error=True, footer_links=["api"],
        ssr_mode=False)


if __name__ == "__main__":
    main()
