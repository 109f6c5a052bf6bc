"""The server paths a web user may name, checked in one place each (the web studio's rule; the CLI is
the user's own shell and is not confined):

- a **name** that becomes one path component (a training run, a DDPM checkpoint, a product, an
  export): :func:`child` = ``root / check_name(name)`` (:func:`studio.store_types.check_name`:
  letters, digits, ``_ . -``, at most 100, no ``..``, no separators, NUL or control characters);
- a **folder or file on the server** (import, export, PatchCore / DDPM data folder, model,
  checkpoint, wall photos): :func:`confine` — inside one of the configured roots
  (``DEFECT_STUDIO_DATA_ROOTS``, ``os.pathsep``-separated; default: the workspace and the folder the
  studio was started in, :attr:`studio.config.Settings.roots`), after ``~``, ``..`` and symbolic
  links are resolved; refused otherwise with a message naming the roots;
- a background job's request (:func:`confine_request`): the web studio's job manager checks the
  path fields of every request it is handed, so a tab that forgot :func:`confine` is still refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from studio.store_types import StoreError, check_name

MAX_PATH_CHARS = 4096
# request fields of the job requests (PatchCoreRequest, DDPM*Request, ExperimentRequest) that name paths
REQUEST_PATH_KEYS = ("data", "out", "positives", "checkpoint", "synthetic", "model")


class PathRefused(StoreError):
    """A server path outside the configured roots, or a name that cannot be a path component."""


def parse_roots(value: str | None, base: Path) -> tuple[Path, ...]:
    """``DEFECT_STUDIO_DATA_ROOTS`` (``os.pathsep``-separated; relative entries against ``base``) as
    resolved folders; () when unset or empty."""
    out = []
    for item in (value or "").split(os.pathsep):
        item = item.strip()
        if item:
            p = Path(item).expanduser()
            out.append((p if p.is_absolute() else base / p).resolve())
    return tuple(dict.fromkeys(out))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…'"


def roots_text(roots: Iterable[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none)"


def confine(value: str | os.PathLike, roots: Iterable[Path], what: str = "folder", *,
            base: Path | None = None) -> Path:
    """``value`` resolved (``~``, relative to ``base`` — default the current folder —, ``..`` and
    symbolic links followed) when it lies inside one of ``roots``; else :class:`PathRefused` naming
    the roots. Existence is not checked here."""
    roots = tuple(roots)
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip():
        raise PathRefused(f"give a {what}")
    text = text.strip()
    if len(text) > MAX_PATH_CHARS:
        raise PathRefused(f"the {what} is {len(text)} characters long (at most {MAX_PATH_CHARS})")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise PathRefused(f"the {what} {_shown(text)} contains NUL or control characters")
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    try:
        real = p.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise PathRefused(f"the {what} {_shown(text)} cannot be resolved: {exc}") from exc
    if not any(real == r or r in real.parents for r in roots):
        raise PathRefused(f"the {what} {_shown(text)} is outside the folders this studio may use "
                          f"({roots_text(roots)}); put it inside one of them, or start the studio "
                          "with DEFECT_STUDIO_DATA_ROOTS listing its folder")
    return real


def child(root: Path, name: object, what: str) -> Path:
    """``root / name`` for a user-given ``name`` that must be one safe path component."""
    try:
        return Path(root) / check_name(name, what)
    except StoreError as exc:
        raise PathRefused(str(exc)) from exc


def safe_component(text: str, fallback: str = "run") -> str:
    """A default name made from something the user gave (a folder name): every character
    :func:`check_name` refuses becomes ``-``; at most 100 characters."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "-" for c in str(text))
    cleaned = cleaned.replace("..", "-").lstrip("._-")[:100]
    return cleaned or fallback


def confine_request(request: dict | None, roots: Iterable[Path]) -> None:
    """Every path field of a job request (:data:`REQUEST_PATH_KEYS`) inside ``roots``."""
    roots = tuple(roots)
    for key in REQUEST_PATH_KEYS:
        value = (request or {}).get(key)
        if isinstance(value, (str, os.PathLike)) and str(value).strip():
            confine(value, roots, f"{key} path")
