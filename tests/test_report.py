"""metalearner.report against a real MLflow SQLite store holding a small synthetic sweep.

The sweep: 4 compare arms x 3 seeds at 20 steps (val loss every 5 steps), seq_len 16.
  static      finals 2.00 2.10 2.20, window 8                          (the baseline)
  ewma-good   finals 1.70 1.81 1.89, window 8 then 32 (capped at 16)   clearly better
  ewma-same   finals 2.02 2.07 2.22, window 4                          within noise of static
  schedule    finals 2.15 2.22 2.31                                    consistently worse
plus a static seed 3 that stopped at step 10 (incomplete) and four search trials of
ewma-good (one cut early by a scheduler). Val loss at step s = final + 0.05 * (20 - s)
unless overridden, so the hand computations below can be read off.
"""

import math
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from metalearner import report
from metalearner.report import stats as report_stats
from metalearner.trace import TRACE_KEYS
from metalearner.tracking import TrackingReader

STEPS, SEQ_LEN, EVAL = 20, 16, (5, 10, 15, 20)
STATIC = {0: 2.00, 1: 2.10, 2: 2.20}
GOOD = {0: 1.70, 1: 1.81, 2: 1.89}
SAME = {0: 2.02, 1: 2.07, 2: 2.22}
SCHED = {0: 2.15, 1: 2.22, 2: 2.31}
EWMA = {"controller.name": "ewma", "controller.factor": "1.01", "controller.beta": "0.9",
        "controller.threshold": "0.01", "controller.base_factor": "None", "controller.min_window": "1"}
T975_2 = stats.t.ppf(0.975, 2)


def val_curve(final, steps=EVAL, **override):
    curve = {s: final + 0.05 * (STEPS - s) for s in steps}
    curve.update({int(k[1:]): v for k, v in override.items()})
    return curve


def log_trial(client, exp_id, parent, arm, phase, seed, controller, val, window, last_step=STEPS, t0=0,
              status="FINISHED"):
    from mlflow.entities import Metric

    tags = {"mlflow.parentRunId": parent, "metalearner.kind": "trial", "metalearner.arm": arm,
            "metalearner.phase": phase, "metalearner.seed": str(seed)}
    run = client.create_run(exp_id, tags=tags, run_name=f"{arm}-{phase}-{seed}", start_time=t0)
    rid = run.info.run_id
    params = {**controller, "train.steps": str(STEPS), "train.seq_len": str(SEQ_LEN), "train.seed": str(seed),
              "model.n_heads": "4", "model.n_global_heads": "1", "model.window": "8", "model.rope_base": "10000.0",
              "model.arch": "decoder"}
    client.log_batch(rid, params=[__import__("mlflow").entities.Param(k, v) for k, v in params.items()])
    ts = int(time.time() * 1000)
    ms = []
    for s in range(1, last_step + 1):
        loss = 3.0 - 0.04 * s + 0.01 * ((s * 7 + seed) % 5)
        ms += [Metric("loss", loss, ts, s), Metric("window", float(window(s)), ts, s),
               Metric("rope_base", 10_000.0 * (1.01 ** s if controller["controller.name"] == "ewma" else 1), ts, s),
               Metric("lr", 1e-3, ts, s)]
        if controller["controller.name"] == "ewma":
            ms.append(Metric("loss_ewma", loss + 0.02, ts, s))
        if s in val:
            ms.append(Metric("val_loss", val[s], ts, s))
    for i in range(0, len(ms), 1000):
        client.log_batch(rid, metrics=ms[i:i + 1000])
    client.set_terminated(rid, status)
    return rid


def fresh_store(tmp_path_factory, folder, experiment):
    """(folder, uri, client, experiment id) of a new SQLite MLflow store with one experiment."""
    import mlflow

    tmp = tmp_path_factory.mktemp(folder)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    return tmp, uri, client, client.create_experiment(experiment, artifact_location=(tmp / "artifacts").as_uri())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp, uri, client, exp_id = fresh_store(tmp_path_factory, "sweep", "toy-sweep")
    old = client.create_run(exp_id, tags={"metalearner.kind": "sweep"}, run_name="older", start_time=1_000)
    parent = client.create_run(exp_id, tags={"metalearner.kind": "sweep"}, run_name="newer", start_time=2_000)
    pid = parent.info.run_id
    static = {"controller.name": "static"}
    sched = {"controller.name": "schedule", "controller.warmup_steps": "10", "controller.shape": "linear"}
    for seed in range(3):
        log_trial(client, exp_id, pid, "static", "compare", seed, static, val_curve(STATIC[seed]), lambda s: 8)
        log_trial(client, exp_id, pid, "ewma-good", "compare", seed, EWMA, val_curve(GOOD[seed]),
                  lambda s: 8 if s <= 10 else 32)
        override = {"s15": 2.05} if seed == 2 else {}
        log_trial(client, exp_id, pid, "ewma-same", "compare", seed, EWMA, val_curve(SAME[seed], **override),
                  lambda s: 4)
        log_trial(client, exp_id, pid, "schedule", "compare", seed, sched, val_curve(SCHED[seed]),
                  lambda s: min(8 + s // 2, 20))
    # a static seed that stopped at step 10: left out of the equal-steps statistics
    log_trial(client, exp_id, pid, "static", "compare", 3, static, val_curve(1.0, steps=(5, 10)), lambda s: 8,
              last_step=10)
    search = {}
    for factor, final, last in (("1.001", 1.90, STEPS), ("1.02", 1.65, STEPS), ("1.05", 1.80, STEPS),
                                ("1.1", 1.00, 10)):
        ctrl = {**EWMA, "controller.factor": factor, "controller.threshold_mode": "rel",
                "controller.min_window": "2"}
        val = val_curve(final, steps=tuple(s for s in EVAL if s <= last))
        search[factor] = log_trial(client, exp_id, pid, "ewma-good", "search", 0, ctrl, val, lambda s: 8,
                                   last_step=last)
    other = client.create_run(exp_id, tags={"metalearner.kind": "train"}, run_name="lonely")
    client.create_run(client.create_experiment("empty-sweep"), tags={"metalearner.kind": "sweep"})
    return {"uri": uri, "client": client, "parent": pid, "older": old.info.run_id, "search": search,
            "other": other.info.run_id}


@pytest.fixture(scope="module")
def loaded(sweep):
    return report.load_traces(sweep["uri"], sweep["parent"])


@pytest.fixture(scope="module")
def table(loaded):
    return report.compare_table(*loaded)


def row(table, arm, phase="compare"):
    sel = table[(table["arm"] == arm) & (table["phase"] == phase)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ---------------------------------------------------------------- finding and loading


def test_find_sweep_by_name_returns_the_newest_sweep_and_by_id(sweep):
    assert TrackingReader(sweep["uri"]).find_sweep("toy-sweep").info.run_id == sweep["parent"]
    assert TrackingReader(sweep["uri"]).find_sweep(sweep["older"]).info.run_id == sweep["older"]


def test_find_sweep_errors_are_one_line(sweep):
    with pytest.raises(ValueError, match=r"no experiment or sweep run named 'nope' in sqlite:///") as e:
        TrackingReader(sweep["uri"]).find_sweep("nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a sweep parent run"):
        TrackingReader(sweep["uri"]).find_sweep(sweep["other"])
    with pytest.raises(ValueError, match="no experiment or sweep run named"):
        TrackingReader(sweep["uri"]).find_sweep("0" * 32)


def test_load_traces_shapes(loaded):
    runs, traces = loaded
    assert len(runs) == 3 * 4 + 1 + 4
    assert set(runs["phase"]) == {"compare", "search"}
    assert {"run_id", "arm", "phase", "seed", "status", "seq_len", "n_heads", "n_global_heads",
            "controller.name", "controller.factor"} <= set(runs.columns)
    assert set(traces.columns) == {"run_id", "step", "key", "value"}
    assert set(traces["key"]) == set(TRACE_KEYS)  # the report keys are asked for, this sweep logged none
    assert not traces.duplicated(["run_id", "key", "step"]).any()
    static = runs[runs["arm"] == "static"]["run_id"]
    assert "loss_ewma" not in set(traces[traces["run_id"].isin(static)]["key"])
    one = runs[(runs["arm"] == "static") & (runs["seed"] == 0)]["run_id"].item()
    loss = traces[(traces["run_id"] == one) & (traces["key"] == "loss")]
    assert sorted(loss["step"]) == list(range(1, STEPS + 1))


# ---------------------------------------------------------------- the table


def test_table_values_by_hand(table):
    static = row(table, "static")
    assert static["n_seeds"] == 3 and static["n_incomplete"] == 1
    assert static["final_val_loss_mean"] == pytest.approx(2.1)
    assert static["final_val_loss_ci95"] == pytest.approx(T975_2 * 0.1 / math.sqrt(3))
    assert static["verdict"] == "baseline"

    good = row(table, "ewma-good")
    assert good["n_seeds"] == 3 and good["n_incomplete"] == 0
    assert good["final_val_loss_mean"] == pytest.approx(np.mean(list(GOOD.values())))
    # first eval step with val <= 2.1: seed 0 (1.95 at 15), seed 1 (2.06 at 15), seed 2 (1.89 at 20)
    assert good["steps_to_static"] == pytest.approx((15 + 15 + 20) / 3)
    assert good["static_reached"] == "3/3"
    assert good["controller"] == "ewma(beta=0.9, factor=1.01, threshold=0.01)"  # default bound omitted

    same = row(table, "ewma-same")
    assert same["best_val_loss_mean"] == pytest.approx((2.02 + 2.07 + 2.05) / 3)
    assert same["final_val_loss_mean"] == pytest.approx((2.02 + 2.07 + 2.22) / 3)
    assert same["steps_to_static"] == pytest.approx((20 + 20 + 15) / 3)

    sched = row(table, "schedule")
    assert sched["static_reached"] == "0/3" and math.isnan(sched["steps_to_static"])


def test_paired_comparison_and_verdict_rule(table):
    good, same, sched = row(table, "ewma-good"), row(table, "ewma-same"), row(table, "schedule")
    a, b = list(GOOD.values()), list(STATIC.values())
    d = np.subtract(a, b)
    assert good["vs_static_delta"] == pytest.approx(d.mean())
    assert good["vs_static_ci95"] == pytest.approx(T975_2 * d.std(ddof=1) / math.sqrt(3))
    assert good["vs_static_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert good["n_paired"] == 3
    assert good["verdict"] == "better" and good["vs_static_p_holm"] < 0.05
    assert sched["verdict"] == "worse" and sched["vs_static_p_holm"] < 0.05
    # +0.02, -0.03, +0.02: Holm does not reject -> no winner
    assert same["vs_static_p_holm"] > 0.05 and same["verdict"] == "no clear difference"


def test_table_order_and_search_rows(table):
    compare = table[table["phase"] == "compare"]
    assert list(compare["arm"]) == ["ewma-good", "static", "ewma-same", "schedule"]
    assert list(table["phase"]) == ["compare"] * 4 + ["search"] * 3  # compare rows first
    search = table[table["phase"] == "search"]
    # the trial cut at step 10 is left out; best first
    assert list(search["final_val_loss_mean"]) == pytest.approx([1.65, 1.80, 1.90])
    assert (search["n_seeds"] == 1).all()
    assert "factor=1.02" in search.iloc[0]["controller"] and "threshold_mode=rel" in search.iloc[0]["controller"]
    # one verdict path: search rows (best of a search, n = 1) are not tested at all
    assert search["verdict"].eq("").all()
    assert search[["vs_static_delta", "vs_static_p", "vs_static_p_holm", "mde"]].isna().all().all()


def test_no_static_arm(loaded):
    runs, traces = loaded
    keep = runs[runs["arm"] != "static"]
    t = report.compare_table(keep, traces[traces["run_id"].isin(keep["run_id"])])
    assert (t.loc[t["phase"] == "compare", "verdict"] == "no static arm").all()
    assert (t.loc[t["phase"] == "search", "verdict"] == "").all()
    assert t["steps_to_static"].isna().all() and t["vs_static_p_holm"].isna().all()


def test_render_table(table):
    text = report.render_table(table)
    assert "±" in text and "better" in text and "no clear difference" in text
    assert "∞ (not all reached)" in text  # schedule: 1/3 seeds reached static's final val loss
    assert "1/3" in text and "0.71×" in text  # ewma-good's attention to target, relative to static
    assert f"{2.1:.4f} ± {T975_2 * 0.1 / math.sqrt(3):.4f}" in text
    assert "ewma-good [search]" in text and "not tested (search)" in text
    header = ["arm", "n", "final val_loss", "Δ vs static", "p Holm", "verdict", "reached", "attn→target",
              "time→target", "controller"]  # IQM only from 5 seeds
    words = " ".join(header).split()
    assert text.split()[:len(words)] == words
    md = report.render_markdown(table)
    assert md.splitlines()[0] == "| " + " | ".join(header) + " |"
    assert md.splitlines()[1].startswith("| ---") and len(md.splitlines()) == 2 + len(table)
    assert report.display_columns()[:3] == ["arm", "n", "final val_loss"] and len(report.display_columns()) <= 12


# ---------------------------------------------------------------- files


def test_export_best_controller_round_trips(loaded, tmp_path):
    spec = report.export_best_controller(*loaded, tmp_path / "best.yaml")
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == spec
    assert spec == {"controller": {"name": "ewma", "beta": 0.9, "factor": 1.01, "min_window": 1,
                                   "threshold": 0.01}}
    spec = report.export_best_controller(*loaded, tmp_path / "searched.yaml", arm="ewma-good")
    c = yaml.safe_load((tmp_path / "searched.yaml").read_text())["controller"]
    assert c == spec["controller"]
    assert c["factor"] == 1.02 and c["threshold_mode"] == "rel" and c["min_window"] == 2
    assert isinstance(c["min_window"], int) and "base_factor" not in c
    with pytest.raises(ValueError, match="arm: got 'nope'"):
        report.export_best_controller(*loaded, tmp_path / "x.yaml", arm="nope")


def test_write_report_writes_plots_and_logs_artifacts_to_the_parent(sweep, tmp_path):
    rep = report.write_report(sweep["uri"], "toy-sweep", tmp_path / "out")
    assert rep.parent_run_id == sweep["parent"] and rep.experiment == "toy-sweep"
    names = {f.name for f in rep.files}
    assert {"comparison.csv", "comparison.md", "best_controller.yaml", "loss.png", "window.png",
            "rope_base.png", "search.png"} <= names
    for f in rep.files:  # the plots are real, non-empty PNGs
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5_000
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert list(csv.columns) == report.TABLE_COLUMNS and len(csv) == len(rep.table)  # every column in the CSV
    assert len(report.TABLE_COLUMNS) > 40 and "attention_cost" not in csv.columns  # one attention-cost measure
    assert "paired" in (tmp_path / "out" / "comparison.md").read_text()
    assert "better" in rep.text
    logged = {a.path for a in sweep["client"].list_artifacts(sweep["parent"], "report")}
    assert {f"report/{n}" for n in names} == logged


def test_write_report_publishes_the_answer_to_the_parent_run(sweep, tmp_path):
    from metalearner.report.view import charted_keys, read_saved_view
    from metalearner.tracking import NOTE_TAG, RUN_COLOR_TAG, ui_features

    client = sweep["client"]
    client.set_tag(sweep["parent"], NOTE_TAG, "the spec's own description")
    rep = report.write_report(sweep["uri"], "toy-sweep", tmp_path / "pub")
    rep = report.write_report(sweep["uri"], "toy-sweep", tmp_path / "pub")  # twice: the note is not doubled
    parent = client.get_run(sweep["parent"])
    note = parent.data.tags[NOTE_TAG]
    assert note.startswith("**better than static: ewma-good")  # the overall answer first, then each arm's line
    assert "ewma-good vs static: better" in note.split("\n\n")[0]
    assert rep.url[rep.url.index("#"):] in note.split("\n\n")[0] and "workflowType=machine_learning" in rep.url
    assert note.endswith("the spec's own description") and note.count("the spec's own description") == 1
    assert "with n=3 seeds, differences in val_loss under" in note
    m = parent.data.metrics
    assert m["compare/ewma-good/val_loss_mean"] == pytest.approx(np.mean(list(GOOD.values())))
    assert m["compare/static/n_incomplete"] == 1 and m["compare/schedule/val_loss_delta_vs_static"] > 0
    if ui_features()["saved_view"]:
        exp_id = parent.info.experiment_id
        assert f"viewStateShareKey={rep.view_key}" in rep.url
        assert charted_keys(read_saved_view(TrackingReader(sweep["uri"]).saved_view(exp_id, rep.view_key)))[:2] == [
            "window", "rope_base"]
        colours = {}
        for t in TrackingReader(sweep["uri"]).trials(sweep["parent"]):  # colours set where the sweep set none
            colours.setdefault((t.data.tags["metalearner.arm"], t.data.tags["metalearner.phase"]), set()).add(
                t.data.tags[RUN_COLOR_TAG])
        assert all(len(c) == 1 for c in colours.values())
        assert colours[("ewma-good", "search")] == {"#9e9e9e"} != colours[("ewma-good", "compare")]


# ---------------------------------------------------------------- statistics wired in


def test_holm_bootstrap_and_mde_are_the_stats_modules(table, loaded):
    cmp = table[table["phase"] == "compare"].set_index("arm")
    raw = cmp.loc[["ewma-good", "ewma-same", "schedule"], "vs_static_p"].to_numpy()
    _, adjusted = report_stats.holm(raw)
    assert cmp.loc[["ewma-good", "ewma-same", "schedule"], "vs_static_p_holm"].to_numpy() == pytest.approx(adjusted)
    good = cmp.loc["ewma-good"]
    lo, hi = report_stats.bootstrap_ci(list(GOOD.values()), n_boot=2_000)
    assert (good["value_boot_low"], good["value_boot_high"]) == pytest.approx((lo, hi))
    assert good["value_mean"] == pytest.approx(np.mean(list(GOOD.values())))
    assert np.isnan(good["value_iqm"])  # n < 5
    # static's 4th seed stopped at step 10: counted, shown, not in the statistics
    static = cmp.loc["static"]
    assert (static["n_runs"], static["n_finished"], static["n_incomplete"], static["n_diverged"]) == (4, 3, 1, 0)
    assert good["n_paired"] == 3 and good["n_missing"] == 1  # seed 3 ran for static only
    comp = report.compare_sweep(*loaded)
    d = [np.subtract(list(a.values()), list(STATIC.values())) for a in (GOOD, SAME, SCHED)]
    pooled = math.sqrt(sum(2 * x.std(ddof=1) ** 2 for x in d) / 6)
    assert comp.mde_sentence == report_stats.mde_sentence(3, report_stats.mde_paired(3, pooled, 0.05, 3), "val_loss",
                                                          0.05, 3)
    text = report.render_table(table)
    assert "p Holm" in text and "(+1 cut)" in text


def test_compute_to_target_by_hand(loaded):
    comp = report.compare_sweep(*loaded)
    assert comp.target == pytest.approx(2.2) and "worst of 3" in comp.target_source  # static's worst final
    t = comp.table[comp.table["phase"] == "compare"].set_index("arm")
    # causal band pairs per sequence, T=16: global head 16*16 - 16*15/2 = 136, local w=8: 128 - 28 = 100;
    # 4 heads of which 1 global: 436 per step at w=8, 544 at w=16 (ewma-good's 32 capped at 16)
    static_cost = 20 * 436  # val 2.20 reached at step 20 by seed 2; seeds 0, 1 also first at 20 (2.25 at 15)
    good = [10 * 436, 10 * 436 + 5 * 544, 10 * 436 + 5 * 544]  # reached at 10, 15, 15
    assert t.loc["static", "attention_to_target"] == pytest.approx(static_cost)
    assert t.loc["ewma-good", "attention_to_target"] == pytest.approx(np.mean(good))
    assert t.loc["ewma-good", "attention_rel"] == pytest.approx(np.mean(good) / static_cost)
    assert t.loc["ewma-good", "attention_rel_high"] < 1  # every resample of ewma-good is cheaper
    # schedule: only seed 0 (2.15) gets to 2.2; a run that never reaches costs +inf
    assert t.loc["schedule", "n_reached"] == 1 and t.loc["schedule", "attention_to_target"] == np.inf
    line = next(v for v in comp.verdicts if v.startswith("ewma-good"))
    assert f"reaches the target with {1 - np.mean(good) / static_cost:.0%} less attention compute" in line
    assert "only 1/3 runs reached the target" in next(v for v in comp.verdicts if v.startswith("schedule"))
    strict = report.compare_sweep(*loaded, target_loss=2.1)
    assert "never reached the target" in next(v for v in strict.verdicts if v.startswith("schedule"))
    assert np.isnan(t.loc["ewma-good", "seconds_to_target"])  # this toy sweep logged no train_seconds
    fixed = report.compare_sweep(*loaded, target_loss=2.5).table.set_index("arm")
    # static val at step 10: 2.50, 2.60, 2.70; at 15: 2.25, 2.35, 2.45 -> reaches 2.5 at 10, 15, 15
    assert fixed.loc["static", "attention_to_target"] == pytest.approx((10 + 15 + 15) * 436 / 3)


def test_metric_and_mode_are_honoured(loaded):
    runs, traces = loaded
    comp = report.compare_sweep(runs, traces, metric="loss", mode="min")
    t = comp.table[comp.table["phase"] == "compare"].set_index("arm")
    last = lambda seed: 3.0 - 0.04 * STEPS + 0.01 * ((STEPS * 7 + seed) % 5)  # noqa: E731
    assert t.loc["static", "value_mean"] == pytest.approx(np.mean([last(s) for s in range(3)]))
    assert "differences in loss under" in comp.mde_sentence
    flipped = report.compare_sweep(runs, traces, mode="max").table
    assert flipped[flipped["phase"] == "compare"]["arm"].iloc[0] == "schedule"  # highest val loss first
    v = flipped[flipped["phase"] == "compare"].set_index("arm").loc[["ewma-good", "schedule"], "verdict"]
    assert v.tolist() == ["worse", "better"]
    with pytest.raises(ValueError, match="mode: got 'up'"):
        report.compare_sweep(runs, traces, mode="up")


@pytest.fixture(scope="module")
def diverged_sweep(tmp_path_factory):
    """static x 3 seeds; ewma x 3 seeds, clearly better, but seed 2 diverged (tag set, cut at step 12)."""
    tmp, uri, client, exp_id = fresh_store(tmp_path_factory, "diverged", "div-sweep")
    pid = client.create_run(exp_id, tags={"metalearner.kind": "sweep"}, run_name="div").info.run_id
    ids = {}
    for seed in range(3):
        log_trial(client, exp_id, pid, "static", "compare", seed, {"controller.name": "static"},
                  val_curve(STATIC[seed]), lambda s: 8)
        last = 12 if seed == 2 else STEPS
        ids[seed] = log_trial(client, exp_id, pid, "ewma", "compare", seed, EWMA,
                              val_curve(GOOD[seed], steps=tuple(s for s in EVAL if s <= last)), lambda s: 8,
                              last_step=last)
    client.set_tag(ids[2], "metalearner.diverged", "true")
    return {"uri": uri, "parent": pid}


def test_a_diverged_seed_is_counted_and_withholds_better(diverged_sweep, tmp_path):
    runs, traces = report.load_traces(diverged_sweep["uri"], diverged_sweep["parent"])
    assert runs["diverged"].sum() == 1
    t = report.compare_table(runs, traces).set_index("arm")
    ewma = t.loc["ewma"]
    assert (ewma["n_runs"], ewma["n_finished"], ewma["n_diverged"], ewma["n_lost"]) == (3, 2, 1, 1)
    assert ewma["vs_static_delta"] < 0 and ewma["verdict"] == "no clear difference"
    rep = report.write_report(diverged_sweep["uri"], "div-sweep", tmp_path, log_to_mlflow=False)
    assert "2 (+1 diverged)" in rep.text and "[1 diverged]" in rep.text


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory):
    """What a resume that lost its checkpoints leaves behind (issue 16).

    static x 3 seeds, finished. ewma x 3 seeds, every run FAILED: seeds 0 and 1 stopped at
    step 12 of 20, seed 2 failed before its first step (tags only: no param, no metric).
    schedule: seed 0 diverged (tag ``metalearner.diverged``, cut at step 12), seed 1 ran
    every step but never logged val_loss, seed 2 finished.
    """
    tmp, uri, client, exp_id = fresh_store(tmp_path_factory, "failed", "failed-sweep")
    pid = client.create_run(exp_id, tags={"metalearner.kind": "sweep"}, run_name="failed").info.run_id
    static, sched = {"controller.name": "static"}, {"controller.name": "schedule", "controller.warmup_steps": "10"}
    for seed in range(3):
        log_trial(client, exp_id, pid, "static", "compare", seed, static, val_curve(STATIC[seed]), lambda s: 8)
    for seed in (0, 1):
        log_trial(client, exp_id, pid, "ewma", "compare", seed, EWMA, val_curve(GOOD[seed], steps=(5, 10)),
                  lambda s: 8, last_step=12, status="FAILED")
    dead = client.create_run(exp_id, run_name="ewma-compare-2", tags={
        "mlflow.parentRunId": pid, "metalearner.kind": "trial", "metalearner.arm": "ewma",
        "metalearner.phase": "compare", "metalearner.seed": "2"}).info.run_id
    client.set_terminated(dead, "FAILED")
    div = log_trial(client, exp_id, pid, "schedule", "compare", 0, sched, val_curve(SCHED[0], steps=(5, 10)),
                    lambda s: 8, last_step=12)
    client.set_tag(div, "metalearner.diverged", "true")
    log_trial(client, exp_id, pid, "schedule", "compare", 1, sched, {}, lambda s: 8)  # no val_loss at all
    log_trial(client, exp_id, pid, "schedule", "compare", 2, sched, val_curve(SCHED[2]), lambda s: 8)
    return {"uri": uri, "parent": pid, "client": client}


def test_failed_missing_and_diverged_runs_never_crash_the_comparison(failed_sweep, tmp_path):
    rep = report.write_report(failed_sweep["uri"], "failed-sweep", tmp_path / "out")  # logged, as `compare` does
    t = rep.table[rep.table["phase"] == "compare"].set_index("arm")
    ewma = t.loc["ewma"]
    assert (ewma["n_runs"], ewma["n_finished"], ewma["n_incomplete"], ewma["n_diverged"]) == (3, 0, 3, 0)
    assert ewma["verdict"] == "no verdict: all 3 runs failed" and np.isnan(ewma["vs_static_p_holm"])
    assert ewma["controller"] == "ewma(beta=0.9, factor=1.01, threshold=0.01)"  # the arm is still named
    sched = t.loc["schedule"]
    assert (sched["n_runs"], sched["n_finished"], sched["n_diverged"], sched["n_incomplete"]) == (3, 1, 1, 1)
    assert (sched["n_paired"], sched["n_lost"], sched["n_missing"]) == (1, 1, 1)
    assert sched["verdict"] == "no clear difference"  # one pair: no test, and a lost seed vetoes "better"
    assert t.loc["static", "verdict"] == "baseline"
    # the arm that failed is a row that says so, in the terminal, the markdown, the CSV and the parent's note
    line = next(x for x in rep.text.splitlines() if x.startswith("ewma "))
    assert "0 (+3 cut)" in line and "no verdict: all 3 runs failed" in line
    assert "ewma vs static: no verdict: all 3 runs failed [3 incomplete]" in rep.text
    assert "schedule vs static: no clear difference (Δ val_loss" in rep.text and "[1 diverged, 1 incomplete]" in rep.text
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("arm")
    assert csv.loc["ewma", "verdict"] == "no verdict: all 3 runs failed" and csv.loc["ewma", "n_incomplete"] == 3
    assert "no verdict: all 3 runs failed" in (tmp_path / "out" / "comparison.md").read_text()
    from metalearner.tracking import NOTE_TAG

    note = failed_sweep["client"].get_run(failed_sweep["parent"]).data.tags[NOTE_TAG]
    assert "ewma vs static: no verdict: all 3 runs failed" in note


def test_a_sweep_without_trials_reports_without_crashing(sweep, tmp_path):
    rep = report.write_report(sweep["uri"], "empty-sweep", tmp_path, log_to_mlflow=False)
    assert rep.table.empty and "(no finished trials)" in rep.text
    assert {f.name for f in rep.files} == {"comparison.csv", "comparison.md"}


# ---------------------------------------------------------------- the trace audit


@pytest.fixture(scope="module")
def dup_sweep(tmp_path_factory):
    """Two static seeds; seed 1 stored steps 5..7 of ``loss`` and ``window`` twice (as a
    restart that repeated them would) and its last val loss twice, the second one 1.95."""
    import mlflow
    from mlflow.entities import Metric

    tmp = tmp_path_factory.mktemp("dups")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("dup-sweep", artifact_location=(tmp / "artifacts").as_uri())
    pid = client.create_run(exp_id, tags={"metalearner.kind": "sweep"}, run_name="dups").info.run_id
    static = {"controller.name": "static"}
    clean = log_trial(client, exp_id, pid, "static", "compare", 0, static, val_curve(2.0), lambda s: 8)
    dup = log_trial(client, exp_id, pid, "static", "compare", 1, static, val_curve(2.1), lambda s: 8)
    ts = int(time.time() * 1000) + 1000
    again = [Metric(k, 9.0 if k == "loss" else 8.0, ts, s) for s in (5, 6, 7) for k in ("loss", "window")]
    client.log_batch(dup, metrics=[*again, Metric("val_loss", 1.95, ts, STEPS)])
    return {"uri": uri, "parent": pid, "clean": clean, "dup": dup}


def test_duplicate_points_are_kept_counted_and_reported(dup_sweep, tmp_path):
    runs, traces = report.load_traces(dup_sweep["uri"], dup_sweep["parent"])
    assert traces.duplicated(["run_id", "key", "step"]).sum() == 7  # kept as stored, not dropped
    assert dict(zip(runs["run_id"], runs["duplicate_points"])) == {dup_sweep["clean"]: 0, dup_sweep["dup"]: 7}
    dups = report.duplicate_points(traces).set_index("key")
    assert set(dups["run_id"]) == {dup_sweep["dup"]}
    assert dups.loc["loss", ["steps", "extra_points", "first_step"]].tolist() == [3, 3, 5]
    assert dups.loc["window", ["steps", "extra_points", "first_step"]].tolist() == [3, 3, 5]
    assert dups.loc["val_loss", ["steps", "extra_points", "first_step"]].tolist() == [1, 1, STEPS]
    # the statistics count each step once, with the point written last
    summary = report.run_summary(runs, traces).loc[dup_sweep["dup"]]
    assert summary["last_step"] == STEPS and summary["complete"]
    assert summary["final_val_loss"] == pytest.approx(1.95)

    rep = report.write_report(dup_sweep["uri"], "dup-sweep", tmp_path, log_to_mlflow=False)
    assert "trace audit: 7 duplicate point(s) in 1 run(s)" in rep.text
    assert f"({dup_sweep['dup']}) loss: 3 step(s) stored more than once, 3 extra point(s), first at step 5" in rep.text
    assert "duplicates.csv" in {f.name for f in rep.files} and len(rep.duplicates) == 3
    assert "trace audit: 7 duplicate point(s)" in (tmp_path / "comparison.md").read_text()


def test_a_clean_sweep_passes_the_trace_audit(sweep, loaded, tmp_path):
    assert report.duplicate_points(loaded[1]).empty and (loaded[0]["duplicate_points"] == 0).all()
    rep = report.write_report(sweep["uri"], "toy-sweep", tmp_path, log_to_mlflow=False)
    assert "trace audit: one point per step per key in every run" in rep.text
    assert "duplicates.csv" not in {f.name for f in rep.files}
