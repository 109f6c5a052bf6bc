"""Annotate tab: pick or upload an image, paint the mask, generate candidates, accept / reject.

Handlers only translate widget values into a ``GenerateRequest`` (or a store call) and format
the result; all logic lives in ``studio.services`` and ``pipelines``.
"""
from __future__ import annotations

import os

import gradio as gr
import numpy as np

from pipelines import masks as M
from pipelines.imageio import ImageInputError, check_array, read_mask, read_rgb
from pipelines.registry import generator_names
from studio.catalog import GOOD
from studio.context import StudioContext
from studio.services import GenerateRequest, UserError, generate, review
from studio.ui.jobs_panel import bind as keep_doc

DAMAGE, COLOUR = "Damage type", "Wall colour"
OVERLAY = np.array([255, 45, 45], np.uint8)


def _editor_value(image: np.ndarray, mask: np.ndarray | None) -> dict:
    """EditorValue with the image as background and the mask as one red RGBA layer."""
    h, w = image.shape[:2]
    layer = np.zeros((h, w, 4), np.uint8)
    composite = image.copy()
    if mask is not None and mask.any():
        on = mask > 0
        layer[on] = (*OVERLAY, 255)
        composite[on] = OVERLAY
    return {"background": image, "layers": [layer], "composite": composite}


def _preview(image: np.ndarray | None, mask: np.ndarray | None, feather: int) -> np.ndarray | None:
    if image is None:
        return None
    if mask is None or not mask.any():
        return image
    alpha = M.feather(mask, int(feather))[..., None] * 0.6
    return (image * (1 - alpha) + OVERLAY * alpha).astype(np.uint8)


def _background(editor: dict | None) -> np.ndarray | None:
    if not editor or editor.get("background") is None:
        return None
    return check_array(editor["background"])


def _caption(cand, colour: str | None) -> str:
    text = f"#{cand.sample_id} · seed {cand.seed} · {cand.generator}"
    if colour and cand.mask is not None and cand.mask.any():
        from pipelines.color import color_metrics
        try:
            met = color_metrics(cand.image, cand.mask, colour)
            text += f" · ΔE2000 {met['delta_e2000']:.2f} · hue err {met['hue_error_deg']:.1f}°"
        except ValueError as exc:  # near-empty mask: reported, not turned into zeros
            text += f" · colour metrics n/a ({exc})"
    return text


# -- generator options: widgets generated from each generator's options dataclass -------------
def _option_widget(spec, users: list[str]):
    label = spec.label or spec.name.replace("_", " ")
    info = f"{spec.help} — {', '.join(users)}"
    common = dict(label=label, info=info, visible=False, elem_id=f"opt-{spec.name}")
    if spec.type is bool:
        return gr.Checkbox(bool(spec.default), **common)
    if spec.choices:
        return gr.Dropdown(["(default)", *spec.choices], value="(default)", **common)
    if spec.type in (int, float) and spec.min is not None and spec.max is not None:
        default = spec.default if spec.default is not None else spec.min
        return gr.Slider(spec.min, spec.max, default, step=spec.step or (1 if spec.type is int else 0.01),
                         **common)
    if spec.type in (int, float):
        return gr.Number(spec.default, precision=0 if spec.type is int else None, **common)
    return gr.Textbox("" if spec.default is None else str(spec.default), **common)


def build_option_widgets() -> list:
    """One widget per generator option (all generators), hidden until its backend is chosen."""
    from pipelines.registry import all_option_specs
    return [_option_widget(spec, users) for spec, users in all_option_specs().values()]


def option_values(**overrides) -> list:
    """The option widgets' values in wiring order: each widget's default, or ``overrides[name]``
    (for API clients that call ``/generate`` positionally)."""
    from pipelines.registry import all_option_specs
    out = []
    for name, (spec, _) in all_option_specs().items():
        if name in overrides:
            out.append(overrides[name])
        elif spec.type is bool:
            out.append(bool(spec.default))
        elif spec.choices:
            out.append("(default)")
        elif spec.type in (int, float) and spec.min is not None and spec.max is not None:
            out.append(spec.default if spec.default is not None else spec.min)
        elif spec.type in (int, float):
            out.append(spec.default)
        else:
            out.append("" if spec.default is None else str(spec.default))
    return out


def option_visibility(backend: str | None) -> list:
    """``gr.update(visible=…)`` per option widget: shown when the chosen backend takes it."""
    from pipelines.registry import all_option_specs
    chosen = None if not backend or backend == "auto" else backend
    return [gr.update(visible=chosen in users) for _, users in all_option_specs().values()]


def options_from_widgets(backend: str | None, values) -> dict:
    """Widget values → the request's options (only the chosen backend's; untouched = default)."""
    from pipelines.registry import all_option_specs
    out = {}
    for (spec, users), value in zip(all_option_specs().values(), values):
        if backend not in users or value in (None, "", "(default)"):
            continue
        if spec.type is not bool and spec.default is not None and value == spec.default:
            continue
        out[spec.name] = value
    return out


def backend_help(bk: str | None) -> str:
    """The backend's description and whether it can run here (with the exact fix when not)."""
    if not bk or bk == "auto":
        return "auto: cut-paste when reference defects of this type exist, else Perlin"
    from pipelines.registry import backend_status, get_info
    ok, message = backend_status(bk)
    info = get_info(bk)
    head = f"**{bk}** — {info.description}"
    if info.full_image:
        head += " *(makes a whole new image: pixels outside the mask are not kept)*"
    return f"{head}  \n{'✅ ' + message if ok else '⚠️ unavailable: ' + message}"


# -- handlers: module level, each takes the context first (testable without a server) ----------
def image_choices(ctx: StudioContext, product: str | None) -> list[tuple[str, int]]:
    if not product:
        return []
    return [(f"#{r['id']} {r['split']}/{r['label']} {os.path.basename(r.get('source_path') or r['path'])}",
             int(r["id"])) for r in ctx.store.list_images(product=product)]


def damage_choices(ctx: StudioContext, product: str | None) -> list[str]:
    return list(ctx.catalog().damage_types(product)) if product else [GOOD]


def default_damage(ctx: StudioContext, product: str | None) -> str:
    return next((t for t in damage_choices(ctx, product) if t != GOOD), GOOD)


def on_product(ctx: StudioContext, p):
    return (gr.update(choices=image_choices(ctx, p), value=None),
            gr.update(choices=damage_choices(ctx, p), value=default_damage(ctx, p)))


def on_pick(ctx: StudioContext, image_id, feather_px):
    if not image_id:
        return gr.update(), 0, None, ""
    try:
        img = ctx.store.load_image(int(image_id))
        gt = ctx.store.load_mask(int(image_id))
    except (KeyError, ValueError, TypeError) as exc:
        raise gr.Error(f"No image #{image_id} in the dataset ({exc})") from exc
    note_txt = f"Loaded image #{int(image_id)} ({img.shape[1]}×{img.shape[0]})"
    if gt is not None and gt.any():
        note_txt += " — its ground-truth mask is shown as a starting point"
    return _editor_value(img, gt), int(image_id), _preview(img, gt, feather_px), note_txt


def on_upload(ctx: StudioContext, path, p, feather_px):
    """An uploaded photo becomes an image of the chosen product (split 'upload': a source to paint
    on, never a training or test image)."""
    if not path:
        return gr.update(), gr.update(), gr.update(), ""
    limit = ctx.settings.max_upload_mb * 1024 * 1024
    if os.path.getsize(path) > limit:
        raise gr.Error(f"{os.path.basename(path)} is {os.path.getsize(path) / 2**20:.1f} MB, over "
                       f"the {ctx.settings.max_upload_mb:g} MB upload limit")
    try:
        img = read_rgb(path, ctx.settings.max_pixels)
        new_id = ctx.store.add_image(p or "unsorted", img, split="upload", label=GOOD, origin="real",
                                     source_path=os.path.basename(path))
    except (ImageInputError, ValueError) as exc:
        raise gr.Error(str(exc)) from exc
    return (_editor_value(img, None), new_id, _preview(img, None, feather_px),
            f"Uploaded {os.path.basename(path)} as image #{new_id} ({img.shape[1]}×{img.shape[0]})")


def current_image(ctx: StudioContext, editor_value, src_id):
    """The source image (from the store, or the editor's background) and the painted mask."""
    image = ctx.store.load_image(int(src_id)) if src_id else _background(editor_value)
    if image is None:
        raise gr.Error("Pick an image from the dataset or upload one first")
    mask = M.mask_from_editor(editor_value, shape=image.shape[:2]) if editor_value else None
    return image, mask


def apply_mask_op(op: str, image: np.ndarray, mask: np.ndarray | None, size: int, damage: str | None,
                  rng: np.random.Generator | None = None, shaped=None) -> np.ndarray:
    """Dilate / erode / invert / clear the mask, or draw a random one: ``shaped(rng)`` (a mask
    shaped like the damage type, see :func:`studio.services.sample_mask`) when given."""
    mask = mask if mask is not None else M.clear(image.shape[:2])
    if op == "dilate":
        return M.dilate(mask, int(size))
    if op == "erode":
        return M.erode(mask, int(size))
    if op == "invert":
        return M.invert(mask)
    if op == "clear":
        return M.clear(image.shape[:2])
    if op == "random":
        rng = rng or np.random.default_rng()
        if shaped is not None:
            return shaped(rng)
        from pipelines.classical import style_for
        return M.random_mask(style_for(damage or "blob"), image.shape[:2], rng)
    raise ValueError(f"unknown mask operation {op!r}")


def on_mask_op(ctx: StudioContext, op: str, editor_value, src_id, size, feather_px, dmg, p):
    image, mask = current_image(ctx, editor_value, src_id)
    shaped = None
    if op == "random" and dmg and dmg != GOOD:
        from studio.services import sample_mask
        shaped = lambda rng: sample_mask(ctx.store, p or "", dmg, image.shape[:2], rng)  # noqa: E731
    mask = apply_mask_op(op, image, mask, size, dmg, shaped=shaped)
    return _editor_value(image, mask), _preview(image, mask, feather_px)


def on_mask_upload(ctx: StudioContext, path, editor_value, src_id, feather_px):
    if not path:
        return gr.update(), gr.update()
    image, _ = current_image(ctx, editor_value, src_id)
    try:
        mask = M.validate_mask(read_mask(path, ctx.settings.max_pixels), image.shape)
    except (ImageInputError, M.MaskError) as exc:
        raise gr.Error(str(exc)) from exc
    return _editor_value(image, mask), _preview(image, mask, feather_px)


def on_edit(ctx: StudioContext, editor_value, src_id, feather_px):
    try:
        image, mask = current_image(ctx, editor_value, src_id)
    except gr.Error:
        return None
    return _preview(image, mask, feather_px)


def on_mode(m):
    return gr.update(visible=m == DAMAGE), gr.update(visible=m == COLOUR)


def on_backend(bk):
    return (backend_help(bk), *option_visibility(bk))


def on_generate(ctx: StudioContext, editor_value, p, src_id, m, dmg, col, bk, num, sd, fth, stg,
                *option_values, progress=gr.Progress()):
    image, mask = current_image(ctx, editor_value, src_id)
    req = GenerateRequest(
        image=image, mask=mask, product=p or "", source_image_id=int(src_id) or None,
        damage_type=dmg if m == DAMAGE else None, color=col if m == COLOUR else None,
        backend=bk or "auto", n=int(num), seed=int(sd or 0), feather=int(fth),
        strength=float(stg), max_pixels=ctx.settings.max_pixels,
        options=options_from_widgets(bk, option_values))
    try:
        out = generate(req, store=ctx.store, catalog=ctx.catalog(),
                       progress=lambda f, msg: progress(f, desc=msg))
    except (UserError, KeyError) as exc:
        raise gr.Error(exc.args[0] if exc.args else str(exc)) from exc
    items = [(c.image, _caption(c, col if m == COLOUR else None)) for c in out]
    info = [{"sample_id": c.sample_id, "seed": c.seed, "generator": c.generator,
             "status": "candidate"} for c in out]
    first_id = out[0].sample_id if out else 0
    what = dmg if m == DAMAGE else col
    return items, info, first_id, f"{len(out)} candidate(s) for **{what}** — select one, then accept or reject"


def on_select(info, evt: gr.SelectData):
    try:
        return int(info[evt.index]["sample_id"])
    except (TypeError, IndexError, KeyError):
        return 0


def on_decide(ctx: StudioContext, decision: str, sample_id, note_text, info):
    if not sample_id:
        raise gr.Error("Select a candidate in the gallery first")
    try:
        row = review(ctx.store, int(sample_id), decision, note=note_text or None)
    except (UserError, KeyError) as exc:
        raise gr.Error(str(exc)) from exc
    info = [dict(c, status=row["status"]) if c.get("sample_id") == row["id"] else c for c in (info or [])]
    return f"Sample #{row['id']} **{row['status']}**", info


def list_images(ctx: StudioContext, product_name: str) -> list[dict]:
    """Images of a product in the dataset: id, split, label, file (for API clients)."""
    return [{"id": int(r["id"]), "split": r["split"], "label": r["label"],
             "file": os.path.basename(r.get("source_path") or r["path"]),
             "has_mask": bool(r.get("mask_path"))}
            for r in ctx.store.list_images(product=product_name)]


# -- layout and wiring ---------------------------------------------------------------------------
def _controls(ctx: StudioContext, first: str | None, products: list[str]) -> dict:
    w: dict = {}
    w["product"] = gr.Dropdown(products, value=first, label="Product", elem_id="product")
    img_opts = image_choices(ctx, first)
    w["first_id"] = img_opts[0][1] if img_opts else None
    w["image_pick"] = gr.Dropdown(img_opts, value=w["first_id"], label="Image from the dataset",
                                  allow_custom_value=True, elem_id="image-pick")
    w["upload"] = gr.File(label="…or upload an image (PNG/JPEG/BMP/TIFF)", type="filepath",
                          file_count="single", elem_id="upload")
    w["source_id"] = gr.Number(w["first_id"] or 0, label="Source image id", precision=0, interactive=False,
                               elem_id="source-id")
    w["mode"] = gr.Radio([DAMAGE, COLOUR], value=DAMAGE, label="Mode", elem_id="mode")
    w["damage"] = gr.Dropdown(damage_choices(ctx, first), value=default_damage(ctx, first),
                              label="Damage type", allow_custom_value=True, elem_id="damage")
    w["color"] = gr.ColorPicker("#3366cc", label="Wall colour", visible=False, elem_id="color")
    w["backend"] = gr.Dropdown(["auto", *generator_names()], value="auto", label="Backend",
                               info="auto: cut-paste when reference defects of this type exist, else Perlin",
                               elem_id="backend")
    with gr.Row():
        w["n"] = gr.Slider(1, 8, 4, step=1, label="Candidates", elem_id="n")
        w["seed"] = gr.Number(0, label="Seed", precision=0, elem_id="seed")
    w["feather"] = gr.Slider(0, 32, 4, step=1, label="Feather radius (px)", elem_id="feather")
    w["strength"] = gr.Slider(0.1, 1.0, 0.8, step=0.05, label="Strength", elem_id="strength")
    w["backend_info"] = gr.Markdown(elem_id="backend-info")
    with gr.Accordion("Generator options", open=False):
        w["options"] = build_option_widgets()
    return w


def _canvas(ctx: StudioContext, first_id) -> dict:
    w: dict = {}
    first_img = ctx.store.load_image(first_id) if first_id else None
    w["editor"] = gr.ImageEditor(
        _editor_value(first_img, None) if first_img is not None else None,
        type="numpy", format="png", image_mode="RGBA", sources=(), transforms=(),
        layers=False, canvas_size=(512, 512), label="Paint the defect region",
        brush=gr.Brush(colors=["#ff2d2d"], color_mode="fixed", default_size=14),
        eraser=gr.Eraser(default_size=18), elem_id="editor")
    with gr.Row():
        w["px"] = gr.Slider(1, 25, 3, step=1, label="Mask op size (px)", elem_id="mask-px")
    with gr.Row():
        for op in MASK_OPS:
            w[f"{op}_btn"] = gr.Button(op.capitalize() if op != "random" else "Random mask", size="sm",
                                       elem_id="random-mask" if op == "random" else None)
    w["mask_upload"] = gr.File(label="…or upload a mask (white or opaque = defect)", type="filepath",
                               file_count="single", height=90, elem_id="mask-upload")
    w["preview"] = gr.Image(first_img, format="png", label="Mask preview (feathered)", interactive=False,
                            elem_id="mask-preview")
    return w


def _review(ctx: StudioContext) -> dict:
    w: dict = {}
    w["gen_btn"] = gr.Button("Generate candidates", variant="primary", elem_id="generate")
    w["gallery"] = gr.Gallery(format="png", columns=2, label="Candidates", allow_preview=False,
                              elem_id="gallery")
    w["cands"] = gr.JSON(label="Candidates (sample ids)", elem_id="candidates", max_height=150)
    w["selected"] = gr.Number(0, label="Selected sample id", precision=0, elem_id="selected")
    w["note"] = gr.Textbox(label="Reviewer note", elem_id="note")
    with gr.Row():
        w["accept_btn"] = gr.Button("Accept", variant="primary", elem_id="accept")
        w["reject_btn"] = gr.Button("Reject", variant="stop", elem_id="reject")
    w["status"] = gr.Markdown(elem_id="annotate-status")
    return w


MASK_OPS = ("dilate", "erode", "invert", "clear", "random")


def build(ctx: StudioContext) -> dict:
    """Render the tab inside the current Blocks and wire it (api_name = the gradio_client endpoint)."""
    products = ctx.product_names()
    first = products[0] if products else None
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            c = _controls(ctx, first, products)
        with gr.Column(scale=2):
            v = _canvas(ctx, c["first_id"])
        with gr.Column(scale=2):
            r = _review(ctx)
    bind = lambda fn, *a: keep_doc(fn, ctx, *a)       # noqa: E731 — handlers take ctx first
    editor, feather, src = v["editor"], c["feather"], c["source_id"]
    def list_images_api(product_name: str) -> list[dict]:
        """Images of a product in the dataset: id, split, label, file, has_mask."""
        return list_images(ctx, product_name)
    gr.api(list_images_api, api_name="list_images")   # gr.api needs type hints (no partial)
    c["product"].change(bind(on_product), c["product"], [c["image_pick"], c["damage"]], api_name="select_product")
    c["image_pick"].change(bind(on_pick), [c["image_pick"], feather], [editor, src, v["preview"], r["status"]],
                           api_name="load_image")
    c["upload"].upload(bind(on_upload), [c["upload"], c["product"], feather],
                       [editor, src, v["preview"], r["status"]], api_name="upload_image")
    v["mask_upload"].upload(bind(on_mask_upload), [v["mask_upload"], editor, src, feather],
                            [editor, v["preview"]], api_name="upload_mask")
    c["mode"].change(on_mode, c["mode"], [c["damage"], c["color"]], api_name=False)
    editor.change(bind(on_edit), [editor, src, feather], v["preview"], api_name=False,
                  trigger_mode="always_last", show_progress="hidden")
    feather.release(bind(on_edit), [editor, src, feather], v["preview"], api_name=False, show_progress="hidden")
    op_inputs = [editor, src, v["px"], feather, c["damage"], c["product"]]
    for op in MASK_OPS:
        v[f"{op}_btn"].click(bind(on_mask_op, op), op_inputs, [editor, v["preview"]], api_name=f"mask_{op}")
    r["gen_btn"].click(bind(on_generate),
                       [editor, c["product"], src, c["mode"], c["damage"], c["color"], c["backend"], c["n"],
                        c["seed"], feather, c["strength"], *c["options"]],
                       [r["gallery"], r["cands"], r["selected"], r["status"]], api_name="generate")
    c["backend"].change(on_backend, c["backend"], [c["backend_info"], *c["options"]], api_name="backend_status")
    r["gallery"].select(on_select, r["cands"], r["selected"], api_name=False)
    for decision, btn in (("accepted", r["accept_btn"]), ("rejected", r["reject_btn"])):
        btn.click(bind(on_decide, decision), [r["selected"], r["note"], r["cands"]], [r["status"], r["cands"]],
                  api_name="accept" if decision == "accepted" else "reject")
    return {"product": c["product"]}
