"""Balancing-plan rules: fixed per-class targets with the "≥ 80 % of target" completion gate,
regeneration (new seed) of candidates that fail verification (score < 0.6, up to 3 retries), the
success-rate monitor (stored with the plan, printed by the CLI) and the attribute mix recorded in
each sample's provenance. Verifiers that fail on purpose make the counts exact."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from studio.__main__ import build_parser, main
from studio.curation import (MAX_RETRIES, RETRY_SEED_STEP, VERIFY_THRESHOLD, CurationError,
                             Thresholds, assign_attributes, make_plan, parse_mix, plan_monitor, plan_status,
                             run_plan, verification_score)


def _fixed(store, cdb, target, labels=("scratch",), **kw):
    return make_plan(store, cdb, "brushed_metal", target=target, labels=list(labels), backends=("perlin",),
                     mode="fixed", **kw)


def test_always_failing_verifier_retries_three_times_per_item(curation_ws):
    store, cdb = curation_ws
    plan = _fixed(store, cdb, 2)
    assert plan["retries"] == MAX_RETRIES == 3 and plan["items"] == 2
    calls = []
    r = run_plan(store, cdb, plan["plan_id"], use_detector=False,
                 verifier=lambda image, mask, scores: calls.append(image.shape) or 0.1)
    assert len(calls) == 2 * (1 + 3)                                 # 1 try + 3 retries per item
    assert r["attempted"] == 8 and r["created"] == 8 and r["auto_rejected"] == 8
    assert r["done"] == 2 and r["pending"] == 0                      # exhausted items are finished
    items = cdb.q("SELECT * FROM plan_items WHERE plan_id=? ORDER BY idx", (plan["plan_id"],))
    assert [(i["attempts"], i["verified"]) for i in items] == [(4, 0), (4, 0)]
    batch = store.samples_in_batch(f"plan{plan['plan_id']}:")
    assert len(batch) == 8 and all(s["status"] == "rejected" for s in batch)
    assert all("verification score 0.10 < 0.6" in s["note"] for s in batch)
    for it in items:                                                  # a new seed for every retry
        seeds = sorted(s["seed"] for s in batch if s["batch_id"].startswith(f"plan{plan['plan_id']}:{it['idx']}"))
        assert seeds == [it["seed"] + k * RETRY_SEED_STEP for k in range(4)]
    m = plan_monitor(cdb, plan["plan_id"])
    row = m["classes"][0]
    assert (row["label"], row["attempted"], row["accepted"], row["success_rate"], row["complete"]) == \
        ("scratch", 8, 0, 0.0, False)
    stored = json.loads(cdb.q("SELECT monitor FROM plans WHERE id=?", (plan["plan_id"],))[0]["monitor"])
    assert stored == m                                                # stored with the plan


def test_verifier_failing_twice_passes_on_the_third_attempt(curation_ws):
    store, cdb = curation_ws
    plan = _fixed(store, cdb, 3, labels=("scratch", "crack"))
    tries: Counter = Counter()

    def twice_then_pass(image, mask, scores):      # items run one after another: fail, fail, pass
        tries["n"] += 1
        return 0.9 if tries["n"] % 3 == 0 else 0.3

    r = run_plan(store, cdb, plan["plan_id"], use_detector=False, verifier=twice_then_pass)
    items = cdb.q("SELECT * FROM plan_items WHERE plan_id=?", (plan["plan_id"],))
    assert all(i["attempts"] == 3 and i["verified"] == 1 and i["score"] == 0.9 for i in items)
    assert r["attempted"] == 18 and r["auto_rejected"] == 12
    m = plan_monitor(cdb, plan["plan_id"])
    for row in m["classes"]:
        assert row["accepted"] == 3 and row["attempted"] == 9 and math.isclose(row["success_rate"], 1 / 3)
        assert row["complete"]
    assert m["overall"]["complete"] and math.isclose(m["overall"]["success_rate"], 1 / 3)
    kept = [s for s in store.samples_in_batch(f"plan{plan['plan_id']}:") if s["status"] == "candidate"]
    assert len(kept) == 6 and all(s["batch_id"].endswith("~r2") for s in kept)


@pytest.mark.parametrize("failing,complete", [({0}, True), ({0, 1}, False)])
def test_complete_at_eighty_percent_of_target(curation_ws, failing, complete):
    """Target 5: 4 verified (80 %) completes the class, 3 (60 %) does not."""
    store, cdb = curation_ws
    plan = _fixed(store, cdb, 5, retries=0)
    assert plan["summary"][0]["complete_at"] == 4
    seen = iter(range(100))
    r = run_plan(store, cdb, plan["plan_id"], use_detector=False,
                 verifier=lambda image, mask, scores: 0.0 if next(seen) in failing else 1.0)
    row = r["monitor"]["classes"][0]
    assert (row["accepted"], row["attempted"], row["complete"]) == (5 - len(failing), 5, complete)


def test_default_verification_maps_thresholds_to_point_six():
    th = Thresholds()
    ok = {"outside_change": 0, "duplicate_distance": th.min_duplicate_distance, "visibility": th.min_visibility}
    assert math.isclose(verification_score(ok, th), VERIFY_THRESHOLD)
    assert verification_score({**ok, "visibility": 0.99 * th.min_visibility}, th) < VERIFY_THRESHOLD
    assert verification_score({**ok, "duplicate_distance": th.min_duplicate_distance - 1}, th) < VERIFY_THRESHOLD
    assert verification_score({**ok, "outside_change": 1}, th) == 0.0
    assert verification_score({"outside_change": 0, "duplicate_distance": 64, "visibility": 9.0}, th) == 1.0


def test_attribute_mix_matches_shares_and_lands_in_provenance(curation_ws, tmp_path):
    assert parse_mix("severity=low:0.5,high:0.5;lighting=dim:1") == \
        {"severity": {"low": 0.5, "high": 0.5}, "lighting": {"dim": 1.0}}
    for bad in ("severity=low:0.5,high:0.6", "severity", "severity=low", "severity=low:-1,high:2"):
        with pytest.raises(CurationError):
            parse_mix(bad)
    got = assign_attributes({"s": {"a": 0.25, "b": 0.75}}, 7, np.random.default_rng(0))
    assert Counter(d["s"] for d in got) == {"a": 2, "b": 5}          # largest remainder: 1.75 → 2, 5.25 → 5
    store, cdb = curation_ws
    plan = _fixed(store, cdb, 4, labels=("scratch", "stain"), mix="severity=low:0.5,high:0.5", retries=0)
    items = cdb.q("SELECT label, attributes FROM plan_items WHERE plan_id=?", (plan["plan_id"],))
    for lab in ("scratch", "stain"):
        assert Counter(json.loads(i["attributes"])["severity"] for i in items if i["label"] == lab) == \
            {"low": 2, "high": 2}
    run_plan(store, cdb, plan["plan_id"], use_detector=False, verifier=lambda *a: 1.0)
    samples = store.samples_in_batch(f"plan{plan['plan_id']}:")
    assert len(samples) == 8
    for s in samples:
        sev = s["params"]["attributes"]["severity"]
        assert s["params"]["strength"] == {"low": 0.45, "high": 0.95}[sev]   # severity drives strength
        assert s["params"]["plan"]["plan_id"] == plan["plan_id"]
    store.accept(samples[0]["id"])
    store.export_mvtec(tmp_path / "exp", "brushed_metal")
    prov = [json.loads(line) for line in (tmp_path / "exp" / "brushed_metal" / "provenance.jsonl").read_text().splitlines()]
    assert any(p.get("params", {}).get("attributes") for p in prov)     # travels with the export


def test_plan_errors(curation_ws):
    store, cdb = curation_ws
    with pytest.raises(CurationError, match="needs a target"):
        make_plan(store, cdb, "brushed_metal", mode="fixed")
    with pytest.raises(CurationError, match="target mode"):
        make_plan(store, cdb, "brushed_metal", target=8, mode="quota")
    # fixed mode ignores current counts: a target below them is fine
    assert _fixed(store, cdb, 1, labels=("scratch", "crack", "stain"))["items"] == 3


def test_cli_plan_make_run_status(curation_ws, tmp_path, capsys):
    store, _ = curation_ws
    base = ["--workspace", str(store.root)]
    assert main(["plan", "make", "--product", "brushed_metal", "--mode", "fixed", "--target", "2",
                 "--labels", "scratch", "--backends", "perlin", "--mix", "severity=low:0.5,high:0.5", *base]) == 0
    out = capsys.readouterr().out
    plan_id = int(out.split("plan #")[1].split(":")[0])
    assert '"mix": "severity: low 1, high 1"' in out
    assert main(["plan", "run", str(plan_id), "--no-detector", "--quiet", *base]) == 0
    out = capsys.readouterr().out
    assert "scratch: accepted 2 / attempted 2 (100 %) · target 2 · complete" in out
    assert main(["plan", "status", str(plan_id), *base]) == 0
    assert "overall: accepted 2 / attempted 2 (100 %)" in capsys.readouterr().out
    assert main(["plan", "make", "--product", "brushed_metal", "--mode", "fixed", *base]) == 2
    assert "needs a target" in capsys.readouterr().err
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    plan_sub = next(a for a in sub.choices["plan"]._actions if a.dest == "plan_cmd")
    text = " ".join(plan_sub.choices["make"].format_help().split())
    for flag in ("--mode", "--target", "--mix", "--retries", "80 %", "0.6"):
        assert flag in text


def test_curation_tab_plan_and_monitor_handlers(curation_ws):
    """The tab's handlers: a fixed-target plan with a mix and retries, then the monitor table."""
    import gradio as gr
    from types import SimpleNamespace

    from studio.ui import curation_tab as C
    store, cdb = curation_ws
    t = SimpleNamespace(store=store, cdb=cdb)
    pid, df = C.do_plan(t, "brushed_metal", 2, 1.0, ["perlin"], "fixed", "severity=low:0.5,high:0.5", 1)
    assert list(df["planned"]) == [2, 2, 2] and list(df["complete_at"]) == [2, 2, 2] and "mix" in df
    assert plan_status(cdb, pid)["params"]["retries"] == 1
    with pytest.raises(gr.Error, match="needs a target"):
        C.do_plan(t, "brushed_metal", 0, 1.0, ["perlin"], "fixed", "", 3)
    with pytest.raises(gr.Error, match="shares must be positive"):
        C.do_plan(t, "brushed_metal", 2, 1.0, ["perlin"], "fixed", "severity=low:2", 3)
    run_plan(store, cdb, pid, use_detector=False, verifier=lambda *a: 0.0)
    result, table = C.live_batch(t, {"status": "running", "request": {"plan_id": pid}, "result": None})
    assert list(table["attempted"]) == [4, 4, 4, 12] and list(table["success_rate"]) == ["0 %"] * 4
    assert list(table["complete"]) == [False] * 4 and list(table["label"])[-1] == "overall"
