"""The experiment's report (report.md), table rows and plotly figure, read from metrics.json."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipelines.fileio import atomic_write_text
from studio.experiment.request import METRIC_KEYS, PRIMARY_METRIC
from studio.experiment.sources import Synthetic


def write_samples(out: Path, examples: dict[str, list[Synthetic]], per_source: int = 8) -> None:
    """``samples/<source>.png``: up to ``per_source`` synthetic defects (spread over the types)
    with their mask outlined in green."""
    from pipelines.imageio import write_png_atomic
    for src, syn in examples.items():
        by_type: dict[str, list[Synthetic]] = {}
        for s in syn:
            by_type.setdefault(s.label, []).append(s)
        picked: list[Synthetic] = []
        while len(picked) < min(per_source, len(syn)):
            for t in sorted(by_type):
                if by_type[t] and len(picked) < per_source:
                    picked.append(by_type[t].pop(0))
        tiles = []
        for s in picked:
            img = np.ascontiguousarray(s.image.copy())
            contours, _ = cv2.findContours(s.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
            tiles.append(img)
        if tiles:
            write_png_atomic(out / "samples" / f"{src.replace('/', '_')}.png", np.concatenate(tiles, axis=1))

# ------------------------------------------------------------------------------------------------
# Report and figure


def _fmt(v: dict) -> str:
    return f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def _fmt_delta(v: dict) -> str:
    """A difference: its Holm-adjusted interval and verdict when it is in the run's family, else
    (exploratory rows) its 95 % interval and no verdict."""
    if v.get("verdict") is None:
        return f"{v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] (exploratory)"
    lo, hi = v.get("ci_adjusted", v["ci95"])
    return f"{v['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] {v['verdict']}"


SEG_ARMS = ("synthetic_only", "reference_only", "reference_plus_synthetic")
PC_ARMS = ("reference_only", "reference_plus_synthetic")


def source_blocks(r: dict) -> dict[str, dict]:
    """``{source: {"patchcore", "segmenter", "verdict"}}`` of a result, in run order."""
    out = {}
    if r.get("synthetic") or not r.get("backends"):
        out[r.get("source", "synthetic")] = {k: r[k] for k in ("patchcore", "segmenter", "verdict", "by_type")
                                             if k in r}
    out.update(r.get("backends") or {})
    return out


def table_rows(r: dict) -> list[dict]:
    """One row per (source, model, arm or delta) with each metric as ``mean [lo, hi]``."""
    rows = []
    for src, b in source_blocks(r).items():
        for model, arms in (("PatchCore", PC_ARMS + ("delta",)),
                            ("segmenter", SEG_ARMS + ("delta", "delta_synthetic_only"))):
            block = b["patchcore" if model == "PatchCore" else "segmenter"]
            for arm in arms:
                row = {"source": src, "model": model, "arm": arm}
                for k in METRIC_KEYS:
                    row[k] = _fmt_delta(block[arm][k]) if arm.startswith("delta") else _fmt(block[arm][k])
                rows.append(row)
    return rows


def _fit_sentence(lists: list[dict]) -> str:
    """What the models were fitted on, per fold, read from the hashes recorded where they were fit
    (``protocol.folds.lists[i].fit``), never a constant."""
    parts = []
    for i, x in enumerate(lists):
        fit = x.get("fit")
        if not fit:
            continue
        syn = ", ".join(f"{v} {k}" for k, v in (fit.get("synthetic") or {}).items())
        parts.append(f"{'fold ' + str(i + 1) + ': ' if len(lists) > 1 else ''}trained on {fit['reference']} "
                     f"reference defects, {fit['evaluation']} evaluation, {fit['train_good']} train/good"
                     + (f", synthetic: {syn}" if syn else ""))
    return ("- Fitted (from the pixel hashes of the arrays each model was fitted on): " + "; ".join(parts) + "."
            if parts else "- Fitted: nothing recorded.")


def _auto_gain(c: dict) -> str:
    if c.get("baseline") is None:
        return f" ({c['ap']:.2f})"
    from pipelines.generators.choose import Choice
    ch = Choice.from_json(c)
    se = f" ± {ch.gain_se:.2f}" if ch.gain_se is not None else ""
    return f" ({ch.gain:+.2f}{se}{' ✓' if ch.helps else ''})"


def _auto_choices(name: str, g: dict) -> str:
    """The report line of an ``auto`` source: per fold and type, what was chosen and its gain."""
    return (f"- {name}: per fold and damage type, the candidate ({', '.join(g['candidates'])}) whose "
            "synthetic defects, added to the fold's other reference defects, gained most pixel AP on "
            "its *reference* defects left out in turn (no evaluation image is read); a type is added to "
            "the reference defects only where that gain is positive and above its standard error over the "
            "left-out groups (✓): " + "; ".join(
                f"fold {int(f) + 1}: " + ", ".join(
                    f"{t} → {c['generator']}" + (_auto_gain(c) if c.get("ap") is not None else " (fixed rule)")
                    for t, c in ch.items())
                for f, ch in g["choices"].items()))


def _generator_lines(r: dict) -> list[str]:
    """Per generator: the model folder per type, the types skipped and auto's choices."""
    lines: list[str] = []
    for name, g in (r.get("generators") or {}).items():
        if g.get("models"):
            by_folder: dict[str, list[str]] = {}
            for t, f in g["models"].items():
                by_folder.setdefault(f, []).append(t)
            lines.append(f"- {name} models: " + "; ".join(
                f"{', '.join(ts)} → `{f}` ({(g.get('model_sources') or {}).get(f, '?')}; its training data: "
                f"{(g.get('model_training_images') or {}).get(f, '?')} real images, "
                f"{(g.get('model_training_scored') or {}).get(f, '?')} of them scored here)"
                for f, ts in by_folder.items()))
        for t, why in g.get("skipped_types", {}).items():
            lines.append(f"- {name}: nothing generated for {t} — {why}")
        if g.get("choices"):
            lines.append(_auto_choices(name, g))
    return lines


def _per_type_lines(r: dict, mc: dict) -> list[str]:
    """The exploratory per-type table (segmenter and PatchCore, primary metric)."""
    lines: list[str] = []
    typed = {src: b["by_type"] for src, b in source_blocks(r).items() if b.get("by_type")}
    if typed:
        lines += ["", f"## Per damage type — exploratory ({PRIMARY_METRIC}; each type's scored defects + every good image; "
                  f"a verdict only with ≥ {mc.get('min_type_verdict', 3)} scored defects, Holm-adjusted in the run's family)", "",
                  "| source | type | n | segmenter synthetic only | segmenter reference only | synthetic / reference | "
                  "segmenter reference + synthetic | segmenter Δ (+ synthetic) | PatchCore reference only | "
                  "PatchCore Δ (+ synthetic) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for src, per in typed.items():
            for t, b in per.items():
                seg, pc = b["segmenter"], b["patchcore"]
                so, ro = seg['synthetic_only'][PRIMARY_METRIC]["mean"], seg['reference_only'][PRIMARY_METRIC]["mean"]
                ratio = f"{100 * so / ro:.0f} %" if ro > 0 else "–"
                lines.append(f"| {src} | {t} | {b['n_evaluation']} | {_fmt(seg['synthetic_only'][PRIMARY_METRIC])} | "
                             f"{_fmt(seg['reference_only'][PRIMARY_METRIC])} | {ratio} | "
                             f"{_fmt(seg['reference_plus_synthetic'][PRIMARY_METRIC])} | "
                             f"{_fmt_delta(seg['delta'][PRIMARY_METRIC])} | "
                             f"{_fmt(pc['reference_only'][PRIMARY_METRIC])} | {_fmt_delta(pc['delta'][PRIMARY_METRIC])} |")
    return lines


def report_markdown(r: dict) -> str:
    p = r["protocol"]
    lines = ["# Did synthetic data help?", ""]
    for src, b in source_blocks(r).items():
        lines.append(f"- **{src}** — {b['verdict']['text']}.")
    mc = p.get("multiple_comparisons") or {}
    fd = p.get("folds") or {"k": 1, "lists": []}
    lines += ["", "A verdict comes only from the interval of a difference: *helped* (entirely above 0), "
              "*hurt* (entirely below 0), *no detectable effect* (contains 0). Intervals: two-level bootstrap "
              f"({p['n_boot']} draws) that resamples the scored images (defects and good images separately) "
              f"*and* the {p['repeats']} repeats (seeds {p['seed']}…{p['seed'] + p['repeats'] - 1}; paired across "
              "arms), so seed-to-seed variation (generation, coreset, segmenter initialisation) is inside them. "
              f"Every verdict of this run is Holm-adjusted over its family of {mc.get('family_size', '?')} "
              "differences (sources × differences × metrics, plus the per-type primary-metric rows with "
              f"≥ {mc.get('min_type_verdict', 3)} scored defects); the intervals shown beside a verdict are at "
              "the Holm-consistent level (recorded per difference in metrics.json as `level`). "
              "Per-type rows are exploratory.", ""]
    if fd["k"] > 1:
        n_def = len(p["evaluation"])
        lines += [f"Cross-fitting: {fd['k']} folds rotate which real defects are reference, so every one of the "
                  f"{n_def} real defects is scored once, by models that learned nothing from it in that fold; "
                  "estimates pool the folds (the mean of the fold metrics). The product's own roles are "
                  "untouched.", ""]
    lines += ["## Protocol", "",
              f"- Data: `{r['data']['category']}` ({r['data']['files']} files, sha256 {r['data']['sha256']}); "
              + (f"{fd['k']} folds (cross-fitting): " + "; ".join(
                  f"fold {i + 1} learns from {len(x['reference'])} and scores {len(x['evaluation'])}"
                  for i, x in enumerate(fd["lists"])) if fd["k"] > 1 else
                 f"roles from {p['roles_source']}: {len(p['reference'])} reference defects (may be learned from), "
                 f"{len(p['evaluation'])} evaluation defects (only scored)") + f", {p['train_good']} train/good.",
              _fit_sentence(fd.get("lists") or []),
              f"- Scored: {len(p['scored'])} images (evaluation defects + test/good).",
              f"- Arm A: PatchCore `{p['backbone']}`, {p['size']} px, coreset "
              f"{'default' if p['coreset'] is None else p['coreset']}; normal bank on train/good (once per "
              "repeat); positive bank = reference defect crops only vs reference + synthetic.",
              f"- Arm B: segmenter (1×1 + 3×3 conv decoder on frozen `{p['backbone']}` features, "
              f"{p['segmenter_steps']} steps, BCE + Dice) trained on synthetic only / reference only / both, "
              "always with every train/good image as a negative.",
              ]
    if p.get("per_type"):
        lines.append(f"- Generated: {p['per_type']} per damage type and repeat on train/good images, masks "
                     "from the shape model fitted on the type's reference masks (pipelines.shapes, on the "
                     "product foreground; on the base image's structure where the reference masks lie on "
                     "structure), each labelled where its generator visibly changed the mask; donors "
                     "(cut-paste, defect transfer) are reference defects only.")
    lines += _generator_lines(r)
    if r.get("synthetic"):
        lines.append(f"- Export: `{r['synthetic']['folder']}`, {r['synthetic']['samples']} samples "
                     f"({', '.join(f'{k} {v}' for k, v in r['synthetic']['per_type'].items())}); checked "
                     "against the evaluation images (pixels and provenance).")
    for src, b in source_blocks(r).items():
        lines += ["", f"## {src}", "", "| model | arm | " + " | ".join(METRIC_KEYS) + " |",
                  "|---|---|" + "---|" * len(METRIC_KEYS)]
        for row in (row for row in table_rows(r) if row["source"] == src):
            lines.append(f"| {row['model']} | {row['arm']} | " + " | ".join(row[k] for k in METRIC_KEYS) + " |")
    lines += _per_type_lines(r, mc)
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    t = r.get("timing", {})
    lines += ["", f"Run time {r['seconds']:.0f} s (PatchCore fit {t.get('patchcore_fit', 0):.0f} s, predict "
                  f"{t.get('patchcore_predict', 0):.0f} s, segmenter training {t.get('segmenter_train', 0):.0f} s, "
                  f"generation {t.get('generate', 0):.0f} s"
                  + (f", auto choice {t['auto_choice']:.0f} s" if t.get("auto_choice") else "") + "). "
                  f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}. {r['created_at']}", ""]
    return "\n".join(lines)


def _ci(v: dict) -> list[float]:
    return v.get("ci_adjusted", v["ci95"])


def experiment_figure(r: dict):
    """Plotly figure: per model, the difference to reference-only training for each metric, with
    95 % intervals as error bars (a bar whose interval excludes 0 is an effect)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("PatchCore positive bank: + synthetic − reference only",
                                                        "Segmenter: arm − reference only"), shared_yaxes=False)
    palette = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2")
    for i, (src, b) in enumerate(source_blocks(r).items()):
        series = [(1, b["patchcore"]["delta"], f"{src}: reference + synthetic", palette[(2 * i) % 6]),
                  (2, b["segmenter"]["delta"], f"{src}: reference + synthetic", palette[(2 * i) % 6]),
                  (2, b["segmenter"]["delta_synthetic_only"], f"{src}: synthetic only", palette[(2 * i + 1) % 6])]
        for col, d, name, colour in series:
            y = [d[k]["mean"] for k in METRIC_KEYS]
            fig.add_bar(x=list(METRIC_KEYS), y=y, name=name, marker_color=colour, legendgroup=name,
                        showlegend=col == 1 or "synthetic only" in name,
                        error_y=dict(type="data", symmetric=False,
                                     array=[_ci(d[k])[1] - d[k]["mean"] for k in METRIC_KEYS],
                                     arrayminus=[d[k]["mean"] - _ci(d[k])[0] for k in METRIC_KEYS]),
                        hovertext=[f"{d[k]['verdict']}: {d[k]['mean']:+.3f} [{_ci(d[k])[0]:+.3f}, "
                                   f"{_ci(d[k])[1]:+.3f}]" for k in METRIC_KEYS], row=1, col=col)
    fig.add_hline(y=0, line_color="#444", line_width=1)
    fig.update_layout(barmode="group", height=380, margin=dict(l=40, r=10, t=60, b=40),
                      title=f"Δ metric vs reference-only training (mean of {r['protocol']['repeats']} repeats, Holm-adjusted CI)")
    return fig


def write_figure(r: dict, out: Path) -> list[str]:
    """``figure.html`` (plotly.js embedded: opens offline) and ``figure.png`` when kaleido is
    installed. Returns the files written."""
    fig = experiment_figure(r)
    atomic_write_text(out / "figure.html", fig.to_html(include_plotlyjs=True, full_html=True))
    written = ["figure.html"]
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return written
    try:
        fig.write_image(str(out / "figure.png"), width=1100, height=420)
        written.append("figure.png")
    except Exception:  # noqa: BLE001 — kaleido without a usable browser: the HTML is enough
        pass
    return written

