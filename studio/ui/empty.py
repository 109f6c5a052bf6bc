"""Empty states: plots, tables, galleries and JSON views stay hidden until they hold data.

An empty plotly figure draws bare axes (−1…6) and an empty table draws headers ("1 2 3"); neither
tells a user anything. :func:`autohide` is applied once to the built app: every such output that
starts empty is hidden, and every event that writes to one shows it exactly when the value it
writes holds data. The guidance text beside it (a job panel's idle line, a tab's hint) says what
to do next and how long it takes.
"""
from __future__ import annotations

import functools
import inspect
import json

import gradio as gr

KINDS = (gr.Plot, gr.Dataframe, gr.Gallery, gr.JSON)


def has_data(value) -> bool:
    """Whether a value written to a plot / table / gallery / JSON view shows anything."""
    if value is None:
        return False
    if hasattr(value, "empty") and hasattr(value, "columns"):           # pandas DataFrame
        return not value.empty
    if hasattr(value, "data") and hasattr(value, "layout"):             # plotly Figure
        return len(value.data) > 0
    if isinstance(value, dict) and "plot" in value:                      # a Plot's config value
        try:
            return bool(json.loads(value["plot"]).get("data"))
        except (TypeError, ValueError):
            return True
    if isinstance(value, dict) and "data" in value and "headers" in value:   # a Dataframe's value
        return any(any(c not in (None, "") for c in row) for row in value["data"] or [])
    if isinstance(value, (list, tuple, dict, str)):
        return len(value) > 0
    return True


def _is_update(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def _shown(value):
    if _is_update(value):
        return value
    return gr.update(value=value, visible=has_data(value))


def _wrap(handler, positions: list[int], n_outputs: int):
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        out = handler(*args, **kwargs)
        if n_outputs == 1:
            return _shown(out)
        out = list(out)
        for i in positions:
            if i < len(out):
                out[i] = _shown(out[i])
        return tuple(out)
    return wrapper


def autohide(demo: gr.Blocks) -> int:
    """Hide the empty plots / tables / galleries / JSON views of ``demo`` and make every page event
    that writes to one show or hide it by its value. Named API endpoints are left as they are (a
    client gets plain values), so only components some page-only event writes to start hidden.
    Returns how many components start hidden."""
    showable: set[int] = set()
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    for bf in fns:
        fn = getattr(bf, "fn", None)
        if fn is None or getattr(bf, "api_visibility", "public") != "private" \
                or inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn) \
                or inspect.isasyncgenfunction(fn):
            continue
        positions = [i for i, o in enumerate(bf.outputs) if isinstance(o, KINDS)]
        if positions and not getattr(bf, "_autohide", False):
            bf.fn = _wrap(fn, positions, len(bf.outputs))
            bf._autohide = True
            showable.update(id(bf.outputs[i]) for i in positions)
    hidden = 0
    for block in demo.blocks.values():
        if id(block) in showable and block.visible is True and not has_data(block.value):
            block.visible = False
            hidden += 1
    return hidden
