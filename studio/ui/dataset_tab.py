"""Dataset tab: browse and filter samples, see provenance, class balance, import and export.

Handlers are module-level functions taking the context first (testable without a server);
``build`` lays the widgets out in small helpers and wires them with ``jobs_panel.bind`` (a
``functools.partial`` that keeps the handler's docstring as the endpoint's API description).
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from pipelines.roles import DEFAULT_REFERENCE_FRACTION, ROLES
from studio.context import StudioContext
from studio.formats import KINDS
from studio.ui.checks import product_name, server_path
from studio.ui.jobs_panel import api_endpoint, bind

ALL = "(all)"
COLUMNS = ["id", "product", "damage_type", "color", "generator", "seed", "status", "note", "created_at"]
ROLE_COLUMNS = ["id", "product", "label", "split", "role", "source"]


def roles_frame(store, product: str | None):
    """Real defect images of a product (or all) with their data role."""
    import pandas as pd
    rows = [r for r in store.list_images(product=product, origin="real") if r["label"] != "good"]
    return pd.DataFrame([[r["id"], r["product"], r["label"], r["split"], r["role"],
                          Path(r["source_path"] or "").name] for r in rows], columns=ROLE_COLUMNS)


def set_role(store, image_id, role, product: str | None):
    """Handler of "Set role": (status text, refreshed table). Errors are gr.Error with the reason."""
    if image_id in (None, ""):
        raise gr.Error("Give the id of a real defect image (see the table)")
    try:
        row = store.set_role(int(image_id), role)
    except (TypeError, ValueError) as exc:
        raise gr.Error(str(exc)) from exc
    stale = row.get("stale_runs") or []
    note = (f" {len(stale)} run(s) that scored it are now marked stale (ids {', '.join(map(str, stale))}; "
            "see the PatchCore tab's runs table)." if stale else "")
    return (f"Image {row['id']} ({row['product']}/{row['label']}) is now **{row['role']}**.{note}",
            roles_frame(store, product))


def balance_figure(rows: list[dict], product: str | None):
    import plotly.graph_objects as go
    rows = [r for r in rows if not product or r["product"] == product]
    labels = [f"{r['product']}/{r['label']}" if not product else r["label"] for r in rows]
    fig = go.Figure()
    for key, name, colour in (("real_train", "real train", "#4c78a8"), ("real_test", "real test", "#72b7b2"),
                              ("synthetic_accepted", "synthetic accepted", "#f58518"),
                              ("candidates", "candidates (unreviewed)", "#bab0ac")):
        fig.add_bar(x=labels, y=[r.get(key, 0) for r in rows], name=name, marker_color=colour)
    fig.update_layout(barmode="group", title=f"Class balance — {product or 'all products'}",
                      xaxis_title="damage type", yaxis_title="images", height=360,
                      margin=dict(l=40, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


def _product_filter(product: str | None) -> str | None:
    return None if product in (None, ALL) else product


# -- handlers: module level, each takes the context first ---------------------------------------
def list_samples(ctx: StudioContext, product, status, damage):
    """Samples matching the filters, the class balance and the data roles of the real defects."""
    store = ctx.store
    rows = store.list_samples(product=_product_filter(product), status=None if status == ALL else status,
                              limit=500)
    if damage:
        damage = damage.lower()
        rows = [r for r in rows if damage in (r.get("damage_type") or "").lower()
                or damage in (r.get("color") or "").lower()]
    import pandas as pd
    frame = pd.DataFrame([[r.get(c) for c in COLUMNS] for r in rows], columns=COLUMNS)
    return frame, balance_figure(store.class_balance(), _product_filter(product)), \
        roles_frame(store, _product_filter(product))


def on_set_role(ctx: StudioContext, image_id, role, product):
    """Set the data role (reference / evaluation) of a real defect image; returns the status and the
    refreshed roles table (of the filtered product)."""
    return set_role(ctx.store, image_id, role, _product_filter(product))


def samples_hint(frame) -> str:
    """The line above the samples table: what to do when it is empty, else how to see a sample."""
    if frame is None or len(frame) == 0:
        return ("**No samples match.** Generate candidates in the **Annotate** tab (paint a mask, press "
                "Generate: about a second each) and accept them (button or key **A**); or set Status to "
                "(all) to see unreviewed candidates.")
    return f"{len(frame)} sample(s) — click a row to see its image, mask and provenance."


def show(ctx: StudioContext, sample_id):
    """A sample's provenance, image and mask (nothing for id 0)."""
    if not sample_id:
        return None, None, None
    store = ctx.store
    try:
        row = store.get_sample(int(sample_id))
    except (KeyError, ValueError) as exc:
        raise gr.Error(str(exc)) from exc
    return row, store.load_sample_image(int(sample_id)), store.load_sample_mask(int(sample_id))


def on_row(ctx: StudioContext, index, data):
    """A click on row ``index[0]`` of the samples table: (sample id, provenance, image, mask)."""
    try:
        row = index[0]
        sid = int(data.iloc[row, 0]) if hasattr(data, "iloc") else int(data[row][0])
    except (TypeError, ValueError, IndexError):
        return gr.update(), gr.update(), gr.update(), gr.update()
    return (sid, *show(ctx, sid))


def do_import(ctx: StudioContext, path, kind, product):
    """Import a folder on the server (MVTec AD / VisA category, KolektorSDD2 or plain images) that
    lies inside the studio's data roots."""
    folder = server_path(ctx, path, "import folder")
    from studio.formats import import_any
    try:
        rep = import_any(ctx.store, folder, kind, product or None)
    except ValueError as exc:
        raise gr.Error(str(exc)) from exc
    return f"Imported ({rep['kind']}): `{json.dumps(rep, default=str)[:800]}`", \
        gr.update(choices=[ALL, *ctx.store.products()])


def do_export(ctx: StudioContext, path, product, export_format="MVTec AD"):
    """Export one product to a folder on the server (inside the studio's data roots): MVTec AD
    layout (with evaluation.txt) or COCO."""
    if not path:
        raise gr.Error("Give an export folder")
    if product == ALL:
        raise gr.Error("Pick one product to export")
    folder = server_path(ctx, path, "export folder", must_exist=False)
    product = product_name(product)
    try:
        if export_format.startswith("COCO"):
            from studio.formats.coco import export_coco
            rep = export_coco(ctx.store, product, folder)
        else:
            rep = ctx.store.export_mvtec(folder, product)
    except ValueError as exc:
        raise gr.Error(str(exc)) from exc
    return f"Exported **{product}** to `{path}`: `{json.dumps(rep, default=str)[:800]}`"


# -- layout and wiring ---------------------------------------------------------------------------
def _browser(ctx: StudioContext) -> dict:
    w: dict = {}
    with gr.Row():
        w["product"] = gr.Dropdown([ALL, *ctx.store.products()], value=ALL, label="Product",
                                   elem_id="ds-product")
        w["status"] = gr.Dropdown([ALL, "candidate", "accepted", "rejected"], value="accepted",
                                  label="Status", elem_id="ds-status")
        w["damage"] = gr.Textbox(label="Damage type / colour contains", elem_id="ds-damage")
        w["refresh"] = gr.Button("Refresh", elem_id="ds-refresh")
    w["hint"] = gr.Markdown(elem_id="ds-hint")
    w["table"] = gr.Dataframe(headers=COLUMNS, interactive=False, label="Samples", elem_id="ds-table",
                              wrap=True)
    with gr.Row():
        with gr.Column():
            w["sample_id"] = gr.State(0)
            w["provenance"] = gr.JSON(label="Provenance", elem_id="ds-provenance")
        w["sample_img"] = gr.Image(format="png", label="Sample", interactive=False)
        w["sample_mask"] = gr.Image(format="png", label="Mask", interactive=False)
    w["balance"] = gr.Plot(label="Class balance", elem_id="ds-balance")
    return w


def _roles() -> dict:
    w: dict = {}
    with gr.Accordion("Data roles of real defects (reference / evaluation)", open=False):
        gr.Markdown("Every real defect image has one role. **reference**: may be learned from or copied "
                    "(cut-paste donors, training data, the positive bank, the experiment's real arm). "
                    "**evaluation**: only ever scored. Roles are set at import (per damage type, "
                    f"{int(DEFAULT_REFERENCE_FRACTION * 100)} % reference, from the pixels) and travel with "
                    "every export (`evaluation.txt`).")
        w["table"] = gr.Dataframe(headers=ROLE_COLUMNS, interactive=False, label="Real defect images",
                                  elem_id="ds-roles", wrap=True)
        with gr.Row():
            w["image"] = gr.Number(None, label="Image id", precision=0, elem_id="ds-role-image")
            w["value"] = gr.Radio(list(ROLES), value="evaluation", label="Role", elem_id="ds-role-value")
            w["btn"] = gr.Button("Set role", elem_id="ds-role-set")
        w["status"] = gr.Markdown(elem_id="ds-role-status")
    return w


def _import_export() -> dict:
    w: dict = {}
    with gr.Accordion("Import / export", open=False):
        with gr.Row():
            w["import_path"] = gr.Textbox(
                label="Folder to import (MVTec AD / VisA category, KolektorSDD2, or plain images)")
            w["import_kind"] = gr.Dropdown(list(KINDS), value="auto", label="Layout")
            w["import_product"] = gr.Textbox(label="Product (plain folders)")
            w["import_btn"] = gr.Button("Import")
        with gr.Row():
            w["export_path"] = gr.Textbox(label="Export folder", elem_id="ds-export-path")
            w["export_format"] = gr.Radio(["MVTec AD", "COCO (RLE masks)"], value="MVTec AD", label="Format",
                                          elem_id="ds-export-format")
            w["export_btn"] = gr.Button("Export product", elem_id="ds-export")
        w["status"] = gr.Markdown(elem_id="ds-io-status")
    return w


def build(ctx: StudioContext) -> dict:
    """Render the tab inside the current Blocks and wire it (api_name = the gradio_client endpoint)."""
    b, r, io = _browser(ctx), _roles(), _import_export()
    refresh = bind(list_samples, ctx)
    filters = [b["product"], b["status"], b["damage"]]
    listed = [b["table"], b["balance"], r["table"]]

    def refresh_page(product, status, damage):
        frame, fig, roles = list_samples(ctx, product, status, damage)
        return frame, fig, roles, samples_hint(frame)
    b["refresh"].click(refresh_page, filters, [*listed, b["hint"]], api_name=False)
    api_endpoint(refresh, filters, listed, "list_samples")
    for f in filters:
        f.change(refresh_page, filters, [*listed, b["hint"]], api_name=False)
    r["btn"].click(bind(on_set_role, ctx), [r["image"], r["value"], b["product"]], [r["status"], r["table"]],
                   api_name="set_role")

    def on_select_row(event: gr.SelectData, data):   # event data needs a type hint (no partial)
        return on_row(ctx, event.index, data)
    b["table"].select(on_select_row, b["table"], [b["sample_id"], b["provenance"], b["sample_img"],
                                                   b["sample_mask"]], api_name=False)
    with gr.Group(visible=False):   # API-only: the endpoint takes the sample id as a value
        api_sid = gr.Number(0, precision=0, label="api sample")
    api_endpoint(bind(show, ctx), api_sid, [b["provenance"], b["sample_img"], b["sample_mask"]], "show_sample")
    io["import_btn"].click(bind(do_import, ctx), [io["import_path"], io["import_kind"], io["import_product"]],
                           [io["status"], b["product"]], api_name="import_folder")
    io["export_btn"].click(bind(do_export, ctx), [io["export_path"], b["product"], io["export_format"]],
                           io["status"], api_name="export")
    return {"refresh": (refresh_page, filters, [*listed, b["hint"]])}
