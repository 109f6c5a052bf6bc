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
from pipelines.registry import auto_description, generator_names, get_info, picks_model
from studio.catalog import GOOD
from studio.context import StudioContext
from studio.services import (TRAINED_DIR, GenerateRequest, UserError, available_backends, backend_status,
                             generate, learned_from, review)
from studio.ui.checks import server_path
from studio.ui.jobs_panel import api_endpoint
from studio.ui.jobs_panel import bind as keep_doc

DAMAGE, COLOUR = "Damage type", "Wall colour"
OVERLAY = np.array([255, 45, 45], np.uint8)
DISPLAY_MAX = 1280     # longest side sent to the browser; the store keeps the full resolution
ZOOM_SIZE = 384        # the defect-region zoom is upscaled to this longest side
MASK_ALPHA = 0.55      # default mask opacity in the editor

# Annotate keyboard shortcuts (ignored while typing in a text field): A accept, R reject,
# N next candidate, [ / ] brush size. The Curation review queue keeps its own (a / r / s).
KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const onAnnotate = document.getElementById('generate')?.offsetParent !== null;
  if (!onAnnotate) return;
  const ids = {a: 'accept', r: 'reject', n: 'next-candidate'};
  const id = ids[e.key.toLowerCase()];
  if (id) { const b = document.getElementById(id); if (b) { b.click(); e.preventDefault(); } return; }
  if (e.key === '[' || e.key === ']') {
    const range = document.querySelector('#brush-size input[type=range]');
    if (!range) return;
    const v = Math.max(2, Math.min(120, Number(range.value) + (e.key === ']' ? 4 : -4)));
    range.value = v;
    range.dispatchEvent(new Event('input', {bubbles: true}));
    range.dispatchEvent(new Event('change', {bubbles: true}));
    e.preventDefault();
  }
});
</script>
"""


def _display_scale(shape) -> float:
    return min(1.0, DISPLAY_MAX / max(shape[:2]))


def display(image: np.ndarray) -> np.ndarray:
    """The image as shown in the browser: its longest side at most ``DISPLAY_MAX`` (INTER_AREA)."""
    s = _display_scale(image.shape)
    if s >= 1.0:
        return image
    import cv2
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _editor_value(image: np.ndarray, mask: np.ndarray | None, opacity: float = MASK_ALPHA) -> dict:
    """EditorValue with the image (resized for display) as background and the mask as one red RGBA
    layer of the given opacity. The painted mask is scaled back to the stored image's size."""
    shown = display(image)
    h, w = shown.shape[:2]
    layer = np.zeros((h, w, 4), np.uint8)
    composite = shown.copy()
    if mask is not None and mask.any():
        on = M.resize_nearest(mask, (h, w)) > 0 if mask.shape[:2] != (h, w) else mask > 0
        a = float(min(max(opacity, 0.05), 1.0))
        layer[on] = (*OVERLAY, round(255 * a))
        composite[on] = (composite[on] * (1 - a) + OVERLAY * a).astype(np.uint8)
    return {"background": shown, "layers": [layer], "composite": composite}


def _preview(image: np.ndarray | None, mask: np.ndarray | None, feather: int) -> np.ndarray | None:
    if image is None:
        return None
    if mask is None or not mask.any():
        return display(image)
    alpha = M.feather(mask, int(feather))[..., None] * 0.6
    return display((image * (1 - alpha) + OVERLAY * alpha).astype(np.uint8))


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


def confined_options(ctx: StudioContext, options: dict) -> dict:
    """The options that name a file or folder (a model, LoRA weights …: ``option(path=True)``) inside
    the studio's data roots; a value outside them is a ``gr.Error`` naming the roots."""
    from pipelines.registry import all_option_specs
    specs = {spec.name: spec for spec, _ in all_option_specs().values()}
    for k, v in options.items():     # a hub id ("org/name") is relative: it passes unchanged
        if k in specs and specs[k].path and isinstance(v, str) and v.strip():
            server_path(ctx, v, f"{k.replace('_', ' ')} path", must_exist=False)
    return options


def current_product(ctx: StudioContext, product, src_id=None) -> str | None:
    """The product the tab generates for: the Product box, else the source image's product."""
    if product and str(product).strip():
        return str(product).strip()
    try:
        return ctx.store.get_image(int(src_id))["product"] if src_id else None
    except (KeyError, ValueError, TypeError):
        return None


def no_model_fix(ctx: StudioContext, backend: str, product: str) -> str:
    """Plain words (backend info and Generate toast): ``product`` has no ``backend`` model, and how to
    get one — the Training tab or the CLI, with the folder the studio finds it in."""
    adapters = ctx.settings.workspace / TRAINED_DIR
    others = [n for n in available_backends("damage", product, ctx.settings.workspace)
              if n != backend and not get_info(n).full_image][:3]
    return (f"No {backend} model for product '{product}' yet, so {backend} cannot generate on it. To get one, "
            f"train it: Training tab → kind {backend}, product {product} (it learns from the product's "
            f"reference defects, real defect photos with their masks; about 15 min on a CPU), or "
            f"`python -m studio train --kind {backend} --data <an MVTec-layout folder named {product}> "
            f"--out {adapters}/{backend}-{product}`. The studio then uses it for {product} by itself."
            + (f" Meanwhile {', '.join(others)} run on {product} without a model." if others else ""))


def backend_help(backend: str | None, product: str | None = None, ctx: StudioContext | None = None) -> str:
    """The backend's description and whether it can run here for ``product`` (with the workspace's
    trained runs when ``ctx`` is given), with the exact fix when not."""
    if not backend or backend == "auto":
        return auto_description("damage")
    workspace = ctx.settings.workspace if ctx is not None else None
    ok, message = backend_status(backend, product or None, workspace)
    info = get_info(backend)
    head = f"**{backend}** — {info.description}"
    if info.full_image:
        head += " *(makes a whole new image: pixels outside the mask are not kept)*"
    if picks_model(backend) and product:
        if ok:
            return f"{head}  \n✅ {message.replace('ready', f'ready for **{product}**', 1)}"
        if ctx is not None:
            return f"{head}  \n⚠️ {no_model_fix(ctx, backend, product)}"
    return f"{head}  \n{'✅ ' + message if ok else '⚠️ unavailable: ' + message}"


def backend_choices(ctx: StudioContext, product: str | None) -> list[tuple[str, str]]:
    """The Backend dropdown's choices (label, name): a backend that cannot run for ``product`` is
    marked (no model for the product / unavailable) but stays selectable, its info says the fix."""
    out = [("auto", "auto")]
    for n in generator_names():
        if backend_status(n, product or None, ctx.settings.workspace)[0]:
            out.append((n, n))
        elif picks_model(n) and product:
            out.append((f"{n} — no model for {product}", n))
        else:
            out.append((f"{n} — unavailable", n))
    return out


# -- handlers: module level, each takes the context first (testable without a server) ----------
def image_choices(ctx: StudioContext, product: str | None) -> list[tuple[str, int]]:
    if not product:
        return []
    return [(f"#{r['id']} {r['split']}/{r['label']} {os.path.basename(r.get('source_path') or r['path'])}",
             int(r["id"])) for r in ctx.store.list_images(product=product)]


def damage_choices(ctx: StudioContext, product: str | None) -> list[str]:
    """The product's damage types; a new product (your own photos) may use any known type."""
    cat = ctx.catalog()
    own = list(cat.damage_types(product)) if product else [GOOD]
    return own if set(own) - {GOOD} else list(cat.all_damage_types())


def default_damage(ctx: StudioContext, product: str | None) -> str:
    return next((t for t in damage_choices(ctx, product) if t != GOOD), GOOD)


def on_product(ctx: StudioContext, product):
    return (gr.update(choices=image_choices(ctx, product), value=None),
            gr.update(choices=damage_choices(ctx, product), value=default_damage(ctx, product)))


def on_pick(ctx: StudioContext, image_id, feather_px):
    if not image_id:
        return gr.update(), 0, None, ""
    try:
        img = ctx.store.load_image(int(image_id))
        gt = ctx.store.load_mask(int(image_id))
    except (KeyError, ValueError, TypeError) as exc:
        raise gr.Error(f"No image #{image_id} in the dataset ({exc})") from exc
    note_txt = f"Loaded image #{int(image_id)} ({img.shape[1]}×{img.shape[0]}) — paint the defect region, then Generate"
    if gt is not None and gt.any():
        note_txt += " — its ground-truth mask is shown as a starting point"
    return _editor_value(img, gt), int(image_id), _preview(img, gt, feather_px), note_txt


def on_upload(ctx: StudioContext, path, product, feather_px):
    """An uploaded photo (PNG / JPEG / TIFF / BMP, 8 or 16 bit, grey, RGB or RGBA) becomes an image
    of the chosen product (split 'upload': a source to paint on, never a training or test image),
    kept at full resolution and shown resized."""
    if not path:
        return gr.update(), gr.update(), gr.update(), ""
    if not product:
        raise gr.Error("Pick a product first (or type a new product name in the Product box), then upload")
    limit = ctx.settings.max_upload_mb * 1024 * 1024
    if os.path.getsize(path) > limit:
        raise gr.Error(f"{os.path.basename(path)} is {os.path.getsize(path) / 2**20:.1f} MB, over "
                       f"the {ctx.settings.max_upload_mb:g} MB upload limit")
    try:
        img = read_rgb(path, ctx.settings.max_pixels)
        new_id = ctx.store.add_image(product, img, split="upload", label=GOOD, origin="real",
                                     source_path=os.path.basename(path))
    except (ImageInputError, ValueError) as exc:
        raise gr.Error(str(exc)) from exc
    shown = display(img)
    size = f"{img.shape[1]}×{img.shape[0]}" + (
        f", shown at {shown.shape[1]}×{shown.shape[0]}" if shown.shape != img.shape else "")
    return (_editor_value(img, None), new_id, _preview(img, None, feather_px),
            f"Uploaded {os.path.basename(path)} as an image of **{product}** ({size}) — paint the defect "
            "region, then Generate")


def current_image(ctx: StudioContext, editor_value, src_id):
    """The source image (from the store, or the editor's background) and the painted mask."""
    image = ctx.store.load_image(int(src_id)) if src_id else _background(editor_value)
    if image is None:
        raise gr.Error("Pick an image from the dataset or upload one first")
    mask = M.mask_from_editor(editor_value, shape=image.shape[:2]) if editor_value else None
    return image, mask


def apply_mask_op(operation: str, image: np.ndarray, mask: np.ndarray | None, size: int, damage: str | None,
                  random_source: np.random.Generator | None = None, shaped=None) -> np.ndarray:
    """Dilate / erode / invert / clear the mask, or draw a random one: ``shaped(random_source)`` (a mask
    shaped like the damage type, see :func:`studio.services.sample_mask`) when given."""
    mask = mask if mask is not None else M.clear(image.shape[:2])
    if operation == "dilate":
        return M.dilate(mask, int(size))
    if operation == "erode":
        return M.erode(mask, int(size))
    if operation == "invert":
        return M.invert(mask)
    if operation == "clear":
        return M.clear(image.shape[:2])
    if operation == "random":
        random_source = random_source or np.random.default_rng()
        if shaped is not None:
            return shaped(random_source)
        from pipelines.classical import style_for
        return M.random_mask(style_for(damage or "blob"), image.shape[:2], random_source)
    raise ValueError(f"unknown mask operation {operation!r}")


def on_mask_op(ctx: StudioContext, operation: str, editor_value, src_id, size, feather_px, damage, product):
    image, mask = current_image(ctx, editor_value, src_id)
    shaped = None
    if operation == "random" and damage and damage != GOOD:
        from studio.services import sample_mask
        shaped = lambda random_source: sample_mask(ctx.store, product or "", damage,  # noqa: E731
                                                   image.shape[:2], random_source)
    mask = apply_mask_op(operation, image, mask, size, damage, shaped=shaped)
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


def on_mode(mode):
    return gr.update(visible=mode == DAMAGE), gr.update(visible=mode == COLOUR)


def on_backend(ctx: StudioContext, backend, product=None, src_id=None):
    """A new backend: its info for the current product, and the options it takes."""
    return (backend_help(backend, current_product(ctx, product, src_id), ctx), *option_visibility(backend))


def on_context(ctx: StudioContext, backend, product_box, src_id):
    """A new product or source image: the backend info and the dropdown's marks follow it."""
    product = current_product(ctx, product_box, src_id)
    return backend_help(backend, product, ctx), gr.update(choices=backend_choices(ctx, product))


def on_generate(ctx: StudioContext, editor_value, product, src_id, mode, damage, colour, backend, count, seed,
                feather, strength, *option_values, progress=gr.Progress()):
    image, mask = current_image(ctx, editor_value, src_id)
    options = confined_options(ctx, options_from_widgets(backend, option_values))
    if backend and backend != "auto" and backend in generator_names() and picks_model(backend) \
            and not options.get("model") and product \
            and not backend_status(backend, product, ctx.settings.workspace)[0]:
        raise gr.Error(no_model_fix(ctx, backend, product))
    req = GenerateRequest(
        image=image, mask=mask, product=product or "", source_image_id=int(src_id) or None,
        damage_type=damage if mode == DAMAGE else None, color=colour if mode == COLOUR else None,
        backend=backend or "auto", n=count, seed=seed or 0, feather=feather,   # the service checks each number
        strength=strength, max_pixels=ctx.settings.max_pixels,
        options=options)
    try:
        out = generate(req, store=ctx.store, catalog=ctx.catalog(),
                       progress=lambda fraction, message: progress(fraction, desc=message))
    except (UserError, KeyError) as exc:
        raise gr.Error(exc.args[0] if exc.args else str(exc)) from exc
    items = [(c.image, _caption(c, colour if mode == COLOUR else None)) for c in out]
    info = [{"sample_id": c.sample_id, "seed": c.seed, "generator": c.generator,
             "status": "candidate",
             "learned_from": learned_from(ctx.store, product or "", c.generator,
                                          damage if mode == DAMAGE else None, c.params)} for c in out]
    first_id = out[0].sample_id if out else 0
    what = damage if mode == DAMAGE else colour
    return items, info, first_id, f"{len(out)} candidate(s) for **{what}** — select one, then accept or reject"


def on_select(info, event: gr.SelectData):
    try:
        return int(info[event.index]["sample_id"])
    except (TypeError, IndexError, KeyError):
        return 0


ZOOM_CONTEXT = 1.6     # the zoom box: this many times the defect's bounding box on each axis …
ZOOM_MIN_SIDE = 48     # … at least this many px, and no more than 2:1 (square-ish)


def defect_box(mask: np.ndarray, context: float = ZOOM_CONTEXT, min_side: int = ZOOM_MIN_SIDE
               ) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the zoom box of a defect — its bounding box grown to ``context`` × its
    size on each axis (at least ``min_side`` px, the short axis at least half the long one, so the
    box stays square-ish), centred on the defect, moved inside the image and always holding the
    whole mask. A small defect on a 256-px image gets a small box (shown magnified); a mask over
    most of the image gets (nearly) the whole image; an empty mask gets the whole image."""
    h, w = mask.shape[:2]
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return 0, h, 0, w
    bb = ((int(ys.min()), int(ys.max()) + 1, h), (int(xs.min()), int(xs.max()) + 1, w))
    sides = [max(round((b1 - b0) * context), min_side, b1 - b0 + 2) for b0, b1, _ in bb]
    sides = [max(s, max(sides) // 2) for s in sides]
    out = []
    for (b0, b1, n), side in zip(bb, sides):
        side = min(side, n)
        start = round((b0 + b1 - side) / 2)
        start = max(min(start, b0), b1 - side)        # the whole mask stays inside
        start = max(0, min(start, n - side))          # the box stays inside the image
        out += [start, start + side]
    return out[0], out[1], out[2], out[3]


def zoom(image: np.ndarray, region: tuple[int, int, int, int], size: int = ZOOM_SIZE) -> np.ndarray:
    """The crop ``region`` of ``image`` resized to ``size`` px on its longest side: upscaled with
    nearest neighbour (the pixels as they are, magnified), downscaled with area averaging."""
    import cv2
    y0, y1, x0, x1 = region
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    s = size / max(crop.shape[:2])
    out_wh = (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s)))
    return cv2.resize(crop, out_wh, interpolation=cv2.INTER_NEAREST if s > 1 else cv2.INTER_AREA)


def candidate_view(ctx: StudioContext, src_id, sample_id, info) -> tuple:
    """(before / after pair, zoomed before / after of the defect region, caption) of one candidate."""
    if not sample_id:
        return None, None, "Select a candidate (click it, or press **N**)."
    try:
        after = ctx.store.load_sample_image(int(sample_id))
        mask = ctx.store.load_sample_mask(int(sample_id))
        row = ctx.store.get_sample(int(sample_id))
    except (KeyError, ValueError) as exc:
        raise gr.Error(f"Candidate {sample_id} is no longer in the dataset ({exc}); generate again") from exc
    src = row.get("source_image_id") or src_id
    before = ctx.store.load_image(int(src)) if src else None
    if before is None or before.shape != after.shape:
        before = after
    box = defect_box(mask > 0)
    entry = next((c for c in info or [] if c.get("sample_id") == int(sample_id)), {})
    what = entry.get("learned_from") or learned_from(ctx.store, row["product"], row["generator"],
                                                     row.get("damage_type"), row.get("params"))
    pos = next((k for k, c in enumerate(info or []) if c.get("sample_id") == int(sample_id)), 0)
    status = entry.get("status") or row["status"]
    caption = (f"**Candidate {pos + 1} of {len(info or []) or 1}** · {status} · seed {row['seed']}  \n"
               f"{what}  \n<small>drag the slider: left = before, right = after · the zoom shows the "
               f"defect region ({box[3] - box[2]}×{box[1] - box[0]} px, "
               f"×{ZOOM_SIZE / max(box[1] - box[0], box[3] - box[2]):.1f})</small>")
    return ((display(before), display(after)), (zoom(before, box), zoom(after, box)), caption)


def next_candidate(sample_id, info) -> int:
    """The candidate after ``sample_id`` (cycling), preferring ones not yet decided; 0 for none."""
    ids = [int(c["sample_id"]) for c in info or [] if c.get("sample_id")]
    if not ids:
        return 0
    start = ids.index(int(sample_id)) + 1 if sample_id and int(sample_id) in ids else 0
    order = ids[start:] + ids[:start]
    status = {int(c["sample_id"]): c.get("status") for c in info or [] if c.get("sample_id")}
    return next((i for i in order if status.get(i) == "candidate"), order[0])


def on_decide(ctx: StudioContext, decision: str, sample_id, note_text, info):
    if not sample_id:
        raise gr.Error("Select a candidate first: click it in the gallery, or press N")
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
    w["product"] = gr.Dropdown(products, value=first, label="Product", allow_custom_value=True,
                               info="type a new name to make a product for your own photos",
                               elem_id="product")
    img_opts = image_choices(ctx, first)
    w["first_id"] = img_opts[0][1] if img_opts else None
    w["image_pick"] = gr.Dropdown(img_opts, value=w["first_id"], label="Image from the dataset",
                                  allow_custom_value=True, elem_id="image-pick")
    w["upload"] = gr.File(label="…or drop / upload your photo (PNG, JPEG, TIFF, BMP; 8/16-bit, grey, RGBA)",
                          type="filepath", file_count="single", height=110,
                          file_types=[".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"], elem_id="upload")
    w["source_id"] = gr.State(w["first_id"] or 0)
    w["mode"] = gr.Radio([DAMAGE, COLOUR], value=DAMAGE, label="Mode", elem_id="mode")
    w["damage"] = gr.Dropdown(damage_choices(ctx, first), value=default_damage(ctx, first),
                              label="Damage type", allow_custom_value=True, elem_id="damage")
    w["color"] = gr.ColorPicker("#3366cc", label="Wall colour", visible=False, elem_id="color")
    w["backend"] = gr.Dropdown(backend_choices(ctx, first), value="auto", label="Backend",
                               info=auto_description("damage"),
                               elem_id="backend")
    with gr.Row():
        w["n"] = gr.Slider(1, 8, 4, step=1, label="Candidates", elem_id="n")
        # no precision / bounds here: the handler gets the number as sent (NaN, 2.5, -5 included)
        # and the service refuses it with a message naming the seed (gradio would answer first)
        w["seed"] = gr.Number(0, label="Seed", step=1, elem_id="seed")
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
        layers=False, canvas_size=(1024, 640), height=660, label="Paint the defect region",
        placeholder="Pick an image of the product on the left, or drop your own photo there "
                    "(it appears here in a second). Then paint the defect with the brush.",
        brush=gr.Brush(colors=[("#ff2d2d", MASK_ALPHA)], color_mode="fixed", default_size=14),
        eraser=gr.Eraser(default_size=18), elem_id="editor")
    with gr.Row():
        w["brush"] = gr.Slider(2, 120, 14, step=1, label="Brush size ( [ and ] )", elem_id="brush-size")
        w["opacity"] = gr.Slider(0.1, 1.0, MASK_ALPHA, step=0.05, label="Mask opacity", elem_id="mask-opacity")
        w["px"] = gr.Slider(1, 25, 3, step=1, label="Mask op size (px)", elem_id="mask-px")
    gr.Markdown("<small>Scroll to zoom, drag with the middle button (or space + drag) to pan; undo / redo "
                "are above the canvas.</small>")
    with gr.Row():
        for op in MASK_OPS:
            w[f"{op}_btn"] = gr.Button(op.capitalize() if op != "random" else "Random mask", size="sm",
                                       elem_id="random-mask" if op == "random" else f"mask-{op}")
    with gr.Accordion("Mask from a file · feathered preview", open=False):
        w["mask_upload"] = gr.File(label="Upload a mask (white or opaque = defect; same size as the image)",
                                   type="filepath", file_count="single", height=90, elem_id="mask-upload")
        w["preview"] = gr.Image(display(first_img) if first_img is not None else None, format="png",
                                label="Mask preview (feathered)", interactive=False, elem_id="mask-preview")
    return w


def _review(ctx: StudioContext) -> dict:
    w: dict = {}
    w["gallery"] = gr.Gallery(format="png", columns=8, rows=1, height=170, object_fit="contain",
                              label="Candidates (click one, or press N)", allow_preview=False,
                              elem_id="gallery", visible=False)
    w["empty"] = gr.Markdown("### No candidates yet\nPaint the defect region on the image, pick the damage "
                             "type, then press **Generate candidates** — 4 classical candidates take about a "
                             "second, 4 pixel-inpaint ones about 10–30 s on a CPU.", elem_id="candidates-empty")
    with gr.Row(visible=False) as w["view_row"]:
        w["compare"] = gr.ImageSlider(label="Before / after (drag the handle)", type="numpy", format="png",
                                      max_height=560, elem_id="before-after", scale=3,
                                      interactive=False)
        w["zoom"] = gr.ImageSlider(label="Zoom on the defect region", type="numpy", format="png",
                                   max_height=560, elem_id="defect-zoom", scale=2,
                                   interactive=False)
    w["caption"] = gr.Markdown(elem_id="candidate-caption")
    with gr.Row():
        w["note"] = gr.Textbox(label="Reviewer note (optional)", elem_id="note", scale=3)
        w["accept_btn"] = gr.Button("Accept (A)", variant="primary", elem_id="accept", scale=1)
        w["reject_btn"] = gr.Button("Reject (R)", variant="stop", elem_id="reject", scale=1)
        w["next_btn"] = gr.Button("Next (N)", elem_id="next-candidate", scale=1)
    w["cands"] = gr.State([])
    w["selected"] = gr.State(0)
    w["status"] = gr.Markdown(elem_id="annotate-status")
    return w


MASK_OPS = ("dilate", "erode", "invert", "clear", "random")


# -- UI glue: ids live in gr.State; these wrap the handlers above for the page's events ----------
def _layer_of(editor_value):
    """The mask layer of an editor value the server just set (kept in session state)."""
    if isinstance(editor_value, dict) and editor_value.get("layers"):
        return editor_value["layers"][0]
    return gr.update()


def with_mask_state(handler):
    """``handler``'s outputs (the editor value first) and the editor's mask layer for the session state:
    a mask set by the server (mask file, mask operation, a defect image's ground truth) is used
    when Generate is pressed before the editor has sent it back."""
    def wrapped(*args):
        out = handler(*args)
        return (*out, _layer_of(out[0]))
    wrapped.__doc__ = handler.__doc__
    return wrapped


def ui_generate(ctx: StudioContext, set_layer, *args, progress=gr.Progress()):
    args = list(args)
    editor_value, src_id = args[0], args[2]
    if set_layer is not None and editor_value:
        try:
            image, painted = current_image(ctx, editor_value, src_id)
        except gr.Error:
            painted = None
        if painted is not None and not painted.any():
            args[0] = dict(editor_value, layers=[set_layer])
    items, info, first_id, status = on_generate(ctx, *args, progress=progress)
    before_after, zoomed, caption = candidate_view(ctx, src_id, first_id, info)
    return (gr.update(value=items, visible=True, selected_index=0 if items else None), info, first_id,
            status, gr.update(visible=False), gr.update(visible=bool(items)), before_after, zoomed, caption)


def ui_select(ctx: StudioContext, src_id, info, event: gr.SelectData):
    sid = on_select(info, event)
    return (sid, *candidate_view(ctx, src_id, sid, info))


def ui_next(ctx: StudioContext, src_id, sample_id, info):
    sid = next_candidate(sample_id, info)
    if not sid:
        raise gr.Warning("No candidates yet — paint a mask and press Generate candidates")
    ids = [int(c["sample_id"]) for c in info]
    return (sid, gr.update(selected_index=ids.index(sid)), *candidate_view(ctx, src_id, sid, info))


def ui_decide(ctx: StudioContext, decision: str, src_id, sample_id, note_text, info):
    status, info = on_decide(ctx, decision, sample_id, note_text, info)
    sid = next_candidate(sample_id, info)
    left = sum(c.get("status") == "candidate" for c in info)
    if left:
        status += f" — {left} left to review"
    else:
        status += " — all candidates reviewed; accepted ones are in the Dataset tab"
        sid = int(sample_id)
    ids = [int(c["sample_id"]) for c in info]
    return (status, info, sid, gr.update(selected_index=ids.index(sid) if sid in ids else None), "",
            *candidate_view(ctx, src_id, sid, info))


def on_brush(size, opacity):
    """New brush size / opacity for the editor (the painted layer is kept)."""
    return gr.update(brush=gr.Brush(colors=[("#ff2d2d", float(opacity))], color_mode="fixed",
                                    default_size=int(size)))


def build(ctx: StudioContext) -> dict:
    """Render the tab inside the current Blocks and wire it (api_name = the gradio_client endpoint).

    The page keeps internal ids (source image, selected sample, candidates) in ``gr.State``; the
    named API endpoints take them as plain values through hidden components."""
    products = ctx.product_names()
    first = products[0] if products else None
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=280):
            c = _controls(ctx, first, products)
            gen_btn = gr.Button("Generate candidates", variant="primary", elem_id="generate", size="lg")
        with gr.Column(scale=4):
            v = _canvas(ctx, c["first_id"])
    r = _review(ctx)
    r["gen_btn"] = gen_btn
    set_layer = gr.State(None)        # the mask layer the server last put in the editor
    with gr.Group(visible=False):   # API-only values: the named endpoints take ids as plain values
        api_src = gr.Number(0, precision=0, label="api source image")
        api_sel = gr.Number(0, precision=0, label="api sample")
        api_cands = gr.JSON(label="api candidates")
    bind = lambda handler, *bound: keep_doc(handler, ctx, *bound)       # noqa: E731 — handlers take ctx first
    editor, feather, src = v["editor"], c["feather"], c["source_id"]
    def list_images_api(product_name: str) -> list[dict]:
        """Images of a product in the dataset: id, split, label, file, has_mask."""
        return list_images(ctx, product_name)
    gr.api(list_images_api, api_name="list_images")   # gr.api needs type hints (no partial)
    c["product"].change(bind(on_product), c["product"], [c["image_pick"], c["damage"]], api_name="select_product")
    c["image_pick"].change(with_mask_state(bind(on_pick)), [c["image_pick"], feather],
                           [editor, src, v["preview"], r["status"], set_layer], api_name=False)
    api_endpoint(bind(on_pick), [c["image_pick"], feather], [editor, api_src, v["preview"], r["status"]],
                 "load_image")
    def upload_and_clear(path, product, feather_px):   # the drop zone is emptied for the next photo
        out = on_upload(ctx, path, product, feather_px)
        return (*out, None, _layer_of(out[0]))
    c["upload"].upload(upload_and_clear, [c["upload"], c["product"], feather],
                       [editor, src, v["preview"], r["status"], c["upload"], set_layer], api_name=False)
    api_endpoint(bind(on_upload), [c["upload"], c["product"], feather], [editor, api_src, v["preview"],
                                                                          r["status"]], "upload_image")
    v["mask_upload"].upload(with_mask_state(bind(on_mask_upload)), [v["mask_upload"], editor, src, feather],
                            [editor, v["preview"], set_layer], api_name=False)
    api_endpoint(bind(on_mask_upload), [v["mask_upload"], editor, api_src, feather], [editor, v["preview"]],
                 "upload_mask")
    c["mode"].change(on_mode, c["mode"], [c["damage"], c["color"]], api_name=False)
    editor.change(bind(on_edit), [editor, src, feather], v["preview"], api_name=False,
                  trigger_mode="always_last", show_progress="hidden")
    feather.release(bind(on_edit), [editor, src, feather], v["preview"], api_name=False, show_progress="hidden")
    for w in (v["brush"], v["opacity"]):
        w.change(on_brush, [v["brush"], v["opacity"]], editor, api_name=False, show_progress="hidden")
    op_inputs = [editor, src, v["px"], feather, c["damage"], c["product"]]
    for op in MASK_OPS:
        v[f"{op}_btn"].click(with_mask_state(bind(on_mask_op, op)), op_inputs, [editor, v["preview"], set_layer],
                             api_name=False)
        api_endpoint(bind(on_mask_op, op), op_inputs, [editor, v["preview"]], f"mask_{op}")
    gen_inputs = [c["product"], c["mode"], c["damage"], c["color"], c["backend"], c["n"], c["seed"], feather,
                  c["strength"], *c["options"]]
    r["gen_btn"].click(bind(ui_generate), [set_layer, editor, c["product"], src, *gen_inputs[1:]],
                       [r["gallery"], r["cands"], r["selected"], r["status"], r["empty"], r["view_row"],
                        r["compare"], r["zoom"], r["caption"]], api_name=False)
    api_endpoint(bind(on_generate), [editor, c["product"], api_src, *gen_inputs[1:]],
                 [r["gallery"], api_cands, api_sel, r["status"]], "generate")
    c["backend"].change(bind(on_backend), [c["backend"], c["product"], src], [c["backend_info"], *c["options"]],
                        api_name="backend_status", show_progress="hidden")
    for changed in (c["product"], src):     # the info and the dropdown's marks follow the product
        changed.change(bind(on_context), [c["backend"], c["product"], src], [c["backend_info"], c["backend"]],
                       api_name=False, show_progress="hidden")
    view = [r["compare"], r["zoom"], r["caption"]]
    def select(src_id, info, event: gr.SelectData):   # event data needs a type hint (no partial)
        return ui_select(ctx, src_id, info, event)
    r["gallery"].select(select, [src, r["cands"]], [r["selected"], *view], api_name=False)
    r["next_btn"].click(bind(ui_next), [src, r["selected"], r["cands"]], [r["selected"], r["gallery"], *view],
                        api_name=False)
    for decision, btn in (("accepted", r["accept_btn"]), ("rejected", r["reject_btn"])):
        btn.click(bind(ui_decide, decision), [src, r["selected"], r["note"], r["cands"]],
                  [r["status"], r["cands"], r["selected"], r["gallery"], r["note"], *view], api_name=False)
        api_endpoint(bind(on_decide, decision), [api_sel, r["note"], api_cands], [r["status"], api_cands],
                     "accept" if decision == "accepted" else "reject")
    return {"product": c["product"]}
