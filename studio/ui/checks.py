"""The tabs' side of :mod:`studio.paths`: a server folder, file or run name from a widget (or a named
API endpoint's argument), checked once and refused as a ``gr.Error`` that names the allowed roots."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.context import StudioContext
from studio.paths import PathRefused, child, confine, safe_component
from studio.store_types import StoreError, check_name


def server_path(ctx: StudioContext, value, what: str, *, folder: bool = True, must_exist: bool = True) -> Path:
    """``value`` inside the studio's roots (:attr:`studio.config.Settings.roots`), resolved; with
    ``must_exist``, an existing folder (``folder``) or file. Refusals are ``gr.Error``."""
    kind = "folder" if folder else "file or folder"
    if not isinstance(value, str) or not value.strip():
        raise gr.Error(f"No {what} given: {value!r} is not a {kind} on the server")
    try:
        p = confine(value, ctx.settings.roots, what, base=ctx.settings.start_dir)
    except PathRefused as exc:
        raise gr.Error(_capital(str(exc))) from exc
    if must_exist and not (p.is_dir() if folder else p.exists()):
        raise gr.Error(f"{_capital(what)}: {str(value).strip()!r} is not a {kind} on the server")
    return p


def optional_path(ctx: StudioContext, value, what: str, *, must_exist: bool = True) -> str:
    """An optional server folder widget: "" when empty, else the text as given once it is inside
    the roots (and, with ``must_exist``, a folder). A model folder passes ``must_exist=False``: it
    may also be a hub id of the local cache (``org/name``, relative: inside the start folder)."""
    value = (value or "").strip() if isinstance(value, str) else value
    if value:
        server_path(ctx, value, what, must_exist=must_exist)
    return value or ""


def run_folder(root: Path, name, default: str, what: str = "run") -> Path:
    """``root / name`` for a user-given run / checkpoint name (``default`` — made safe — when empty)."""
    text = (name or "").strip() if isinstance(name, str) else name
    try:
        return child(root, text or safe_component(default), what)
    except PathRefused as exc:
        raise gr.Error(_capital(str(exc))) from exc


def product_name(value) -> str:
    """A product picked in a dropdown (or sent to an endpoint): a valid name, else ``gr.Error``."""
    try:
        return check_name(value, "product")
    except StoreError as exc:
        raise gr.Error(_capital(str(exc))) from exc


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
