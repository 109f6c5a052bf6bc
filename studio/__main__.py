"""Headless CLI: ``python -m studio {demo-data,import,generate,export,samples,review} --help``.

Every command exits non-zero with a one-line message on bad input (never a traceback for a
user error) and writes nothing partial. This module builds the parser; the command groups live
in :mod:`studio.cli` (dataset, plans, generation, evaluation, training).
"""
from __future__ import annotations

import argparse
import sys

from studio.cli import dataset, evaluation, generation, plans, training


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="Defect Studio, headless.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def ws(sp):
        sp.add_argument("--workspace", help="workspace folder (default: $DEFECT_STUDIO_WORKSPACE or ./workspace)")
    dataset.add_commands(sub, ws)
    plans.add_commands(sub, ws)
    generation.add_commands(sub, ws)
    evaluation.add_commands(sub, ws)
    training.add_commands(sub, ws)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ValueError as exc:  # StoreError, ImageInputError, MaskError, LayoutError … : user-facing
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, FileNotFoundError) as exc:  # unknown backbone / generator name, missing file
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
