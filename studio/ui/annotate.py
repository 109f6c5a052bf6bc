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


def build(ctx: StudioContext) -> dict:
    """Render the tab inside the current Blocks; returns components other tabs may wire to."""
    store = ctx.store
    products = ctx.product_names()
    first = products[0] if products else None

    def image_choices(product: str | None) -> list[tuple[str, int]]:
        if not product:
            return []
        rows = store.list_images(product=product)
        return [(f"#{r['id']} {r['split']}/{r['label']} {os.path.basename(r.get('source_path') or r['path'])}",
                 int(r["id"])) for r in rows]

    def damage_choices(product: str | None) -> list[str]:
        return list(ctx.catalog().damage_types(product)) if product else [GOOD]

    def default_damage(product):
        types = damage_choices(product)
        return next((t for t in types if t != GOOD), GOOD)

    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            product = gr.Dropdown(products, value=first, label="Product", elem_id="product")
            img_opts = image_choices(first)
            first_id = img_opts[0][1] if img_opts else None
            image_pick = gr.Dropdown(img_opts, value=first_id, label="Image from the dataset",
                                     allow_custom_value=True, elem_id="image-pick")
            upload = gr.File(label="…or upload an image (PNG/JPEG/BMP/TIFF)", type="filepath",
                             file_count="single", elem_id="upload")
            source_id = gr.Number(first_id or 0, label="Source image id", precision=0, interactive=False,
                                  elem_id="source-id")
            mode = gr.Radio([DAMAGE, COLOUR], value=DAMAGE, label="Mode", elem_id="mode")
            damage = gr.Dropdown(damage_choices(first), value=default_damage(first),
                                 label="Damage type", allow_custom_value=True, elem_id="damage")
            color = gr.ColorPicker("#3366cc", label="Wall colour", visible=False, elem_id="color")
            backend = gr.Dropdown(["auto", *generator_names()], value="auto", label="Backend",
                                  info="auto: cut-paste when real defects of this type exist, else Perlin",
                                  elem_id="backend")
            with gr.Row():
                n = gr.Slider(1, 8, 4, step=1, label="Candidates", elem_id="n")
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            feather = gr.Slider(0, 32, 4, step=1, label="Feather radius (px)", elem_id="feather")
            strength = gr.Slider(0.1, 1.0, 0.8, step=0.05, label="Strength", elem_id="strength")
            backend_info = gr.Markdown(elem_id="backend-info")
            with gr.Accordion("Generator options", open=False):
                option_widgets = build_option_widgets()
        with gr.Column(scale=2):
            first_img = store.load_image(first_id) if first_id else None
            editor = gr.ImageEditor(
                _editor_value(first_img, None) if first_img is not None else None,
                type="numpy", format="png", image_mode="RGBA", sources=(), transforms=(),
                layers=False, canvas_size=(512, 512), label="Paint the defect region",
                brush=gr.Brush(colors=["#ff2d2d"], color_mode="fixed", default_size=14),
                eraser=gr.Eraser(default_size=18), elem_id="editor")
            with gr.Row():
                px = gr.Slider(1, 25, 3, step=1, label="Mask op size (px)", elem_id="mask-px")
            with gr.Row():
                dilate_btn = gr.Button("Dilate", size="sm")
                erode_btn = gr.Button("Erode", size="sm")
                invert_btn = gr.Button("Invert", size="sm")
                clear_btn = gr.Button("Clear", size="sm")
                random_btn = gr.Button("Random mask", size="sm", elem_id="random-mask")
            mask_upload = gr.File(label="…or upload a mask (white or opaque = defect)", type="filepath",
                                  file_count="single", height=90, elem_id="mask-upload")
            preview = gr.Image(first_img, format="png", label="Mask preview (feathered)", interactive=False,
                               elem_id="mask-preview")
        with gr.Column(scale=2):
            gen_btn = gr.Button("Generate candidates", variant="primary", elem_id="generate")
            gallery = gr.Gallery(format="png", columns=2, label="Candidates", allow_preview=False,
                                 elem_id="gallery")
            cands = gr.JSON(label="Candidates (sample ids)", elem_id="candidates", max_height=150)
            selected = gr.Number(0, label="Selected sample id", precision=0, elem_id="selected")
            note = gr.Textbox(label="Reviewer note", elem_id="note")
            with gr.Row():
                accept_btn = gr.Button("Accept", variant="primary", elem_id="accept")
                reject_btn = gr.Button("Reject", variant="stop", elem_id="reject")
            status = gr.Markdown(elem_id="annotate-status")

    # -- handlers --------------------------------------------------------------------------
    def on_product(p):
        return (gr.update(choices=image_choices(p), value=None),
                gr.update(choices=damage_choices(p), value=default_damage(p)))

    def on_pick(image_id, feather_px):
        if not image_id:
            return gr.update(), 0, None, ""
        try:
            img = store.load_image(int(image_id))
            gt = store.load_mask(int(image_id))
        except (KeyError, ValueError, TypeError) as exc:
            raise gr.Error(f"No image #{image_id} in the dataset ({exc})") from exc
        note_txt = f"Loaded image #{int(image_id)} ({img.shape[1]}×{img.shape[0]})"
        if gt is not None and gt.any():
            note_txt += " — its ground-truth mask is shown as a starting point"
        return _editor_value(img, gt), int(image_id), _preview(img, gt, feather_px), note_txt

    def on_upload(path, p, feather_px):
        if not path:
            return gr.update(), gr.update(), gr.update(), ""
        limit = ctx.settings.max_upload_mb * 1024 * 1024
        if os.path.getsize(path) > limit:
            raise gr.Error(f"{os.path.basename(path)} is {os.path.getsize(path) / 2**20:.1f} MB, over "
                           f"the {ctx.settings.max_upload_mb:g} MB upload limit")
        try:
            img = read_rgb(path, ctx.settings.max_pixels)
        except ImageInputError as exc:
            raise gr.Error(str(exc)) from exc
        new_id = store.add_image(p or "unsorted", img, split="upload", label=GOOD, origin="real",
                                 source_path=os.path.basename(path))
        return (_editor_value(img, None), new_id, _preview(img, None, feather_px),
                f"Uploaded {os.path.basename(path)} as image #{new_id} ({img.shape[1]}×{img.shape[0]})")

    def _current(editor_value, src_id):
        image = store.load_image(int(src_id)) if src_id else _background(editor_value)
        if image is None:
            raise gr.Error("Pick an image from the dataset or upload one first")
        mask = M.mask_from_editor(editor_value, shape=image.shape[:2]) if editor_value else None
        return image, mask

    def mask_op(op):
        def handler(editor_value, src_id, size, feather_px, dmg, p):
            image, mask = _current(editor_value, src_id)
            mask = mask if mask is not None else M.clear(image.shape[:2])
            if op == "dilate":
                mask = M.dilate(mask, int(size))
            elif op == "erode":
                mask = M.erode(mask, int(size))
            elif op == "invert":
                mask = M.invert(mask)
            elif op == "clear":
                mask = M.clear(image.shape[:2])
            elif op == "random":
                from pipelines.classical import style_for
                rng = np.random.default_rng()
                mask = M.random_mask(style_for(dmg or "blob"), image.shape[:2], rng)
            return _editor_value(image, mask), _preview(image, mask, feather_px)
        return handler

    def on_mask_upload(path, editor_value, src_id, feather_px):
        if not path:
            return gr.update(), gr.update()
        image, _ = _current(editor_value, src_id)
        try:
            mask = M.validate_mask(read_mask(path, ctx.settings.max_pixels), image.shape)
        except (ImageInputError, M.MaskError) as exc:
            raise gr.Error(str(exc)) from exc
        return _editor_value(image, mask), _preview(image, mask, feather_px)

    def on_edit(editor_value, src_id, feather_px):
        try:
            image, mask = _current(editor_value, src_id)
        except gr.Error:
            return None
        return _preview(image, mask, feather_px)

    def on_mode(m):
        return gr.update(visible=m == DAMAGE), gr.update(visible=m == COLOUR)

    def on_backend(bk):
        return (backend_help(bk), *option_visibility(bk))

    def on_generate(editor_value, p, src_id, m, dmg, col, bk, num, sd, fth, stg, *option_values,
                    progress=gr.Progress()):
        image, mask = _current(editor_value, src_id)
        req = GenerateRequest(
            image=image, mask=mask, product=p or "", source_image_id=int(src_id) or None,
            damage_type=dmg if m == DAMAGE else None, color=col if m == COLOUR else None,
            backend=bk or "auto", n=int(num), seed=int(sd or 0), feather=int(fth),
            strength=float(stg), max_pixels=ctx.settings.max_pixels,
            options=options_from_widgets(bk, option_values))
        try:
            out = generate(req, store=store, catalog=ctx.catalog(),
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

    def decide(decision):
        def handler(sample_id, note_text, info):
            if not sample_id:
                raise gr.Error("Select a candidate in the gallery first")
            try:
                row = review(store, int(sample_id), decision, note=note_text or None)
            except (UserError, KeyError) as exc:
                raise gr.Error(str(exc)) from exc
            info = [dict(c, status=row["status"]) if c.get("sample_id") == row["id"] else c
                    for c in (info or [])]
            return f"Sample #{row['id']} **{row['status']}**", info
        return handler

    def list_images(product_name: str) -> list[dict]:
        """Images of a product in the dataset: id, split, label, file (for API clients)."""
        return [{"id": int(r["id"]), "split": r["split"], "label": r["label"],
                 "file": os.path.basename(r.get("source_path") or r["path"]),
                 "has_mask": bool(r.get("mask_path"))}
                for r in store.list_images(product=product_name)]

    # -- wiring (api_name = the gradio_client endpoint) ---------------------------------------
    gr.api(list_images, api_name="list_images")
    product.change(on_product, product, [image_pick, damage], api_name="select_product")
    image_pick.change(on_pick, [image_pick, feather], [editor, source_id, preview, status],
                      api_name="load_image")
    upload.upload(on_upload, [upload, product, feather], [editor, source_id, preview, status],
                  api_name="upload_image")
    mask_upload.upload(on_mask_upload, [mask_upload, editor, source_id, feather], [editor, preview],
                       api_name="upload_mask")
    mode.change(on_mode, mode, [damage, color], api_name=False)
    editor.change(on_edit, [editor, source_id, feather], preview, api_name=False,
                  trigger_mode="always_last", show_progress="hidden")
    feather.release(on_edit, [editor, source_id, feather], preview, api_name=False,
                    show_progress="hidden")
    op_inputs = [editor, source_id, px, feather, damage, product]
    for btn, op in ((dilate_btn, "dilate"), (erode_btn, "erode"), (invert_btn, "invert"),
                    (clear_btn, "clear"), (random_btn, "random")):
        btn.click(mask_op(op), op_inputs, [editor, preview], api_name=f"mask_{op}")
    gen_btn.click(on_generate,
                  [editor, product, source_id, mode, damage, color, backend, n, seed, feather, strength,
                   *option_widgets],
                  [gallery, cands, selected, status], api_name="generate")
    backend.change(on_backend, backend, [backend_info, *option_widgets], api_name="backend_status")
    gallery.select(on_select, cands, selected, api_name=False)
    accept_btn.click(decide("accepted"), [selected, note, cands], [status, cands], api_name="accept")
    reject_btn.click(decide("rejected"), [selected, note, cands], [status, cands], api_name="reject")
    return {"product": product}
