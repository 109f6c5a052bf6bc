"""Rules of docs/ARCHITECTURE.md that a source scan checks (issue 23): one module opens SQLite, and
the tabs' functions name their parameters (none of 3 letters or fewer but ``ctx``)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("pipelines", "studio") for p in sorted((ROOT / d).rglob("*.py"))]


def test_sqlite_is_opened_in_one_place():
    calls = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in PRODUCT for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "connect"
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "sqlite3"]
    assert len(calls) == 1 and calls[0].startswith("studio/db.py:"), calls


def test_no_ui_function_parameter_of_three_letters_or_fewer_but_ctx():
    short = []
    for path in sorted((ROOT / "studio" / "ui").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            a = node.args
            names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
            short += [f"{path.name}:{node.lineno} {getattr(node, 'name', 'lambda')}({n})" for n in names
                      if len(n) <= 3 and n not in ("ctx", "self", "cls")]
    assert not short, short
