"""Dataset tab: browse and filter samples, see provenance, class balance, import and export."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from pipelines.roles import DEFAULT_REFERENCE_FRACTION, ROLES
from studio.context import StudioContext
from studio.formats import KINDS

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
    return (f"Image {row['id']} ({row['product']}/{row['label']}) is now **{row['role']}**.",
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


def build(ctx: StudioContext) -> dict:
    store = ctx.store

    with gr.Row():
        f_product = gr.Dropdown([ALL, *store.products()], value=ALL, label="Product", elem_id="ds-product")
        f_status = gr.Dropdown([ALL, "candidate", "accepted", "rejected"], value="accepted",
                               label="Status", elem_id="ds-status")
        f_damage = gr.Textbox(label="Damage type / colour contains", elem_id="ds-damage")
        refresh = gr.Button("Refresh", elem_id="ds-refresh")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Samples", elem_id="ds-table",
                         wrap=True)
    with gr.Row():
        with gr.Column():
            sample_id = gr.Number(0, label="Sample id", precision=0, elem_id="ds-sample-id")
            provenance = gr.JSON(label="Provenance", elem_id="ds-provenance")
        sample_img = gr.Image(format="png", label="Sample", interactive=False)
        sample_mask = gr.Image(format="png", label="Mask", interactive=False)
    balance_plot = gr.Plot(label="Class balance", elem_id="ds-balance")
    with gr.Accordion("Data roles of real defects (reference / evaluation)", open=False):
        gr.Markdown("Every real defect image has one role. **reference**: may be learned from or copied "
                    "(cut-paste donors, training data, the positive bank, the experiment's real arm). "
                    "**evaluation**: only ever scored. Roles are set at import (per damage type, "
                    f"{int(DEFAULT_REFERENCE_FRACTION * 100)} % reference, from the pixels) and travel with "
                    "every export (`evaluation.txt`).")
        roles_table = gr.Dataframe(headers=ROLE_COLUMNS, interactive=False, label="Real defect images",
                                   elem_id="ds-roles", wrap=True)
        with gr.Row():
            role_image = gr.Number(None, label="Image id", precision=0, elem_id="ds-role-image")
            role_value = gr.Radio(list(ROLES), value="evaluation", label="Role", elem_id="ds-role-value")
            role_btn = gr.Button("Set role", elem_id="ds-role-set")
        role_status = gr.Markdown(elem_id="ds-role-status")
    with gr.Accordion("Import / export", open=False):
        with gr.Row():
            import_path = gr.Textbox(label="Folder to import (MVTec AD / VisA category, KolektorSDD2, or plain images)")
            import_kind = gr.Dropdown(list(KINDS), value="auto", label="Layout")
            import_product = gr.Textbox(label="Product (plain folders)")
            import_btn = gr.Button("Import")
        with gr.Row():
            export_path = gr.Textbox(label="Export folder", elem_id="ds-export-path")
            export_format = gr.Radio(["MVTec AD", "COCO (RLE masks)"], value="MVTec AD", label="Format",
                                     elem_id="ds-export-format")
            export_btn = gr.Button("Export product", elem_id="ds-export")
        io_status = gr.Markdown(elem_id="ds-io-status")

    def list_samples(p, s, d):
        rows = store.list_samples(product=None if p == ALL else p, status=None if s == ALL else s,
                                  limit=500)
        if d:
            d = d.lower()
            rows = [r for r in rows if d in (r.get("damage_type") or "").lower()
                    or d in (r.get("color") or "").lower()]
        import pandas as pd
        frame = pd.DataFrame([[r.get(c) for c in COLUMNS] for r in rows], columns=COLUMNS)
        return frame, balance_figure(store.class_balance(), None if p == ALL else p), \
            roles_frame(store, None if p == ALL else p)

    def on_row(evt: gr.SelectData, data):
        try:
            row = evt.index[0]
            sid = int(data.iloc[row, 0]) if hasattr(data, "iloc") else int(data[row][0])
        except (TypeError, ValueError, IndexError):
            return gr.update(), gr.update(), gr.update(), gr.update()
        return (sid, *show(sid))

    def show(sid):
        if not sid:
            return None, None, None
        try:
            row = store.get_sample(int(sid))
        except (KeyError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        return row, store.load_sample_image(int(sid)), store.load_sample_mask(int(sid))

    def do_import(path, kind, product):
        if not path or not Path(path).expanduser().is_dir():
            raise gr.Error(f"{path!r} is not a folder on the server")
        from studio.formats import import_any
        try:
            rep = import_any(store, path, kind, product or None)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Imported ({rep['kind']}): `{json.dumps(rep, default=str)[:800]}`", \
            gr.update(choices=[ALL, *store.products()])

    def do_export(path, p, fmt="MVTec AD"):
        if not path:
            raise gr.Error("Give an export folder")
        if p == ALL:
            raise gr.Error("Pick one product to export")
        try:
            if fmt.startswith("COCO"):
                from studio.formats.coco import export_coco
                rep = export_coco(store, p, Path(path).expanduser())
            else:
                rep = store.export_mvtec(Path(path).expanduser(), p)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Exported **{p}** to `{path}`: `{json.dumps(rep, default=str)[:800]}`"

    filters = [f_product, f_status, f_damage]
    listed = [table, balance_plot, roles_table]
    refresh.click(list_samples, filters, listed, api_name="list_samples")
    for f in filters:
        f.change(list_samples, filters, listed, api_name=False)
    role_btn.click(lambda i, r, p: set_role(store, i, r, None if p == ALL else p),
                   [role_image, role_value, f_product], [role_status, roles_table], api_name="set_role")
    table.select(on_row, table, [sample_id, provenance, sample_img, sample_mask], api_name=False)
    sample_id.submit(show, sample_id, [provenance, sample_img, sample_mask], api_name="show_sample")
    import_btn.click(do_import, [import_path, import_kind, import_product], [io_status, f_product],
                     api_name="import_folder")
    export_btn.click(do_export, [export_path, f_product, export_format], io_status, api_name="export")
    return {"refresh": (list_samples, filters, listed)}
