""""Did synthetic data help?" — the studio's measuring stick.

Protocol (``python -m studio experiment``, the Curation tab's Experiment step):

* **Folds** (:mod:`studio.experiment.folds`). With ``--folds K`` (default 3 when every damage
  type has at least 3 real defects, else 1) the experiment rotates which real defects are
  reference: in fold ``f`` one group is scored and the others may be learned from, so every real
  defect is scored once, by models that learned nothing from it in that fold. ``--folds 1`` is
  the product's own roles (:func:`pipelines.roles.category_roles`: only its evaluation defects
  are scored). The product's roles are never changed; ``metrics.json`` → ``protocol.folds``
  lists each fold's reference and evaluation files. A source that learned from real defects
  outside the protocol (an export's ancestry, a trained model's data) can only run where none of
  them is scored: with the default it falls back to one fold, saying why.
* **The guard.** Every array a model is fitted on (normal bank, positive bank, every segmenter
  training set) passes :func:`pipelines.guard.guard` against what its fold scores (decoded
  pixels, exact and near-duplicate); the recorded ``training_hashes`` and the report's "trained
  on N reference defects, 0 evaluation" come from the hashes it returns.
* **Synthetic defects** come from an export (``--synthetic DIR``: ``synthetic/<type>/*.png`` +
  ``synthetic_ground_truth/``; refused, naming the sample, when its ``provenance.jsonl`` says it
  descends from an evaluation image or its pixels equal one) and/or are made inside the protocol
  (``--generate perlin,cutpaste|all --per-type N``): N per damage type on ``train/good`` images,
  with masks from the studio's shape model fitted on that type's reference masks only
  (:class:`MaskSampler`: :mod:`pipelines.shapes`, kept on the product foreground estimated from
  ``train/good``); cut-paste donors are that type's reference defects only. Every generator gets
  the same base images, masks and seeds, so they are compared on equal terms. A generator that
  picks its model per product (pixel-inpaint) runs, unless ``--model`` names one, with the model
  the registry finds for the product (the data folder's name) *and each damage type*: the
  workspace's newest trained run (``<workspace>/adapters``), else the shipped one
  (``assets/models/<product>/…``); a type no model was trained for is skipped, with a note. Each
  model's training data (``training_data.json``) is checked against the evaluation images, and
  ``metrics.json`` → ``generators`` records which model folder made which type.
* **Arm A — PatchCore, dual bank.** The normal bank is fitted on ``train/good`` once per repeat
  and reused; only the positive bank changes (``fit_positive`` replaces it): reference real
  defect crops only vs reference + synthetic.
* **Arm B — supervised segmenter** (:mod:`pipelines.segmenter`, the downstream test of DRAEM /
  AnomalyDiffusion): trained on synthetic only, reference real defects only, and both; each
  training set also holds every ``train/good`` image with an empty mask. In "both" the
  synthetic defects come on top of the reference-only arm's batches (as many synthetic as real
  positives per batch, the real batches unchanged), so the comparison is "the same training plus
  synthetic defects", not real defects diluted by many synthetic ones.
* **Repeats.** ``K`` repeats (default 5); repeat ``k`` uses seed ``S + k`` for the coreset, the
  segmenter's initialisation and batches, and the generation (base images, masks, generator
  seeds). The folds never change between repeats.
* **Statistics** (:mod:`pipelines.stats`, docs/STATISTICS.md). Every metric (pixel AUROC, pixel
  AP, AUPRO, image AUROC) and every delta is ``{"mean", "ci95"}``: the mean over repeats and
  folds, and a two-level bootstrap interval that resamples the scored images (stratified) and
  the repeats (paired across arms). Every verdict — ``helped`` / ``no detectable effect`` /
  ``hurt`` — is Holm-adjusted over the run's whole family (:mod:`studio.experiment.results`):
  ``p_holm``, ``ci_adjusted`` at a Holm-consistent ``level``. Per-type rows are exploratory: no
  verdict below 3 scored defects. The headline uses :data:`PRIMARY_METRIC` (pixel AP: threshold
  free and sensitive to the few defect pixels; pixel AUROC saturates near 1).

Outputs in ``--out``: ``metrics.json`` (blocks described in :func:`run_experiment`), ``report.md``,
``figure.html`` (plotly, error bars; ``figure.png`` too when kaleido is installed) and
``samples/<generator>.png`` (a few synthetic defects of the first repeat, mask outlined).
Deterministic: two runs with the same inputs write the same numbers.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipelines import roles as R
from pipelines.fileio import atomic_write_json, atomic_write_text
from pipelines.training import CancelFn, ProgressFn
from studio.experiment.generators import (SHIPPED_MODELS, GeneratorPlan, experiment_generators, pick_models,
                                          resolve_generators, synthesize)
from studio.experiment.protocol import load_protocol, run_protocol
from studio.experiment.report import (experiment_figure, report_markdown, source_blocks, table_rows,
                                      write_figure, write_samples)
from studio.experiment.request import METRIC_KEYS, PRIMARY_METRIC, ExperimentRequest
from studio.experiment.results import blocks, result
from studio.experiment.sources import MaskSampler, Synthetic, load_export


def run_experiment(req: ExperimentRequest, progress: ProgressFn | None = None,
                   cancelled: CancelFn | None = None) -> dict:
    """Run the protocol of the module docstring; write ``metrics.json``, ``report.md`` and the
    figure to ``req.out``; return the metrics dict.

    Blocks: ``protocol`` (every scored defect, the folds with their reference / evaluation lists
    and what was fitted in each, repeats, seed, the Holm family), ``patchcore`` {reference_only,
    reference_plus_synthetic, delta}, ``segmenter`` {synthetic_only, reference_only,
    reference_plus_synthetic, delta, delta_synthetic_only} — every metric ``{"mean", "ci95"}``
    (deltas add ``p``, ``p_holm``, ``ci_adjusted``, ``level``, ``verdict``) — ``verdict``, with
    ``--generate`` ``backends`` {name: {patchcore, segmenter, verdict, by_type}}; the top-level
    blocks refer to ``--synthetic`` if given, else to the first generator. ``real_only`` /
    ``with_synthetic`` / ``delta`` hold arm A's means (backward compatible). ``training_hashes``
    lists the pixel hashes of every array any model was fitted on, as the guard returned them."""
    req.validate()
    t_start = time.perf_counter()
    say = progress or (lambda f, m="": None)
    d, run = run_protocol(req, say, cancelled)
    say(0.95, f"bootstrap ({req.n_boot} draws)")
    res = result(req, run, blocks(req, run), t_start)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    write_samples(out, run.examples)
    atomic_write_json(out / "metrics.json", res, indent=1)
    atomic_write_text(out / "report.md", report_markdown(res))
    write_figure(res, out)
    say(1.0, "done")
    return res


__all__ = ["ExperimentRequest", "run_experiment", "report_markdown", "experiment_figure", "write_figure",
           "table_rows", "source_blocks", "MaskSampler", "Synthetic", "load_export", "load_protocol",
           "resolve_generators", "experiment_generators", "pick_models", "synthesize", "GeneratorPlan",
           "SHIPPED_MODELS", "METRIC_KEYS", "PRIMARY_METRIC"]
