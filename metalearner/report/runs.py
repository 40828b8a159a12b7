"""A sweep's runs and traces as pandas frames, and what each run amounts to.

A sweep is an MLflow parent run (tag ``metalearner.kind = "sweep"``) whose children are
trials (tags ``metalearner.arm``, ``metalearner.phase`` = ``compare`` | ``search``,
``metalearner.seed``), each holding the per-step traces of DESIGN.md. The queries are
`metalearner.tracking.TrackingReader`'s; this module only shapes what they return.

Traces are kept exactly as stored: a step stored twice for a key (a defect, since the
contract is one point per step per key) stays in ``traces_df`` and is counted by
`duplicate_points`, so the report can show it. The summaries use `one_point_per_step`
(the point written last) so that a duplicate cannot double-count a step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd
import yaml

from metalearner.controllers import BOUND_PARAMS
from metalearner.trace import TRACE_KEYS
from metalearner.tracking import ARM_TAG, DIVERGED_TAG, PHASE_TAG, SEED_TAG, STOPPED_EARLY_TAG, TrackingReader
from metalearner.tracking.lineage import perturbations_in
from metalearner.tracking.ui import sweep_arm_colours

NULLS = ("", "None", "none", "null", "Null", "NULL", "~")
RUN_COLUMNS = ["run_id", "run_name", "arm", "phase", "seed", "status", "start_time", "train_steps", "seq_len",
               "n_heads", "n_global_heads", "model_window", "model_rope_base", "arch", "diverged", "stopped_early",
               "duplicate_points", "trial_id", "colour", "perturbations"]
# what the report reads beyond DESIGN's trace keys: cumulative training seconds (wall-clock
# to target), the trials' summary metrics, and the divergence counter
REPORT_KEYS = ("train_seconds", "steps_completed", "val_loss_final", "nonfinite_steps")
FALSE_TAGS = ("", "0", "false", "False", "no")
DUPLICATE_COLUMNS = ["run_id", "key", "steps", "extra_points", "first_step"]
SETTING_PREFIX = "controller."  # metrics of the settings in force (a population-based scheduler's), fetched too
PERTURBATION_COLUMNS = ["run_id", "n", "step", "donor_trial", "donor_run", "donor_step", "key", "old", "new"]


def parse_value(text: Any) -> Any:
    """A param string back to a Python value (``"1.005"`` -> 1.005); None for nulls."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    if not isinstance(text, str):
        return text
    if text.strip() in NULLS:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def number(text: Any) -> float:
    """A param string as a float; NaN when it is not a number."""
    v = parse_value(text)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def _run_row(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    seed = parse_value(tags.get(SEED_TAG, params.get("train.seed")))
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "arm": tags.get(ARM_TAG) or params.get("controller.name") or "?",
        "phase": tags.get(PHASE_TAG) or "compare",
        "seed": seed if isinstance(seed, int) else tags.get(SEED_TAG),
        "status": run.info.status,
        "start_time": run.info.start_time,
        "train_steps": number(params.get("train.steps")),
        "seq_len": number(params.get("train.seq_len")),
        "n_heads": number(params.get("model.n_heads")),
        "n_global_heads": number(params.get("model.n_global_heads")),
        "model_window": number(params.get("model.window")),
        "model_rope_base": number(params.get("model.rope_base")),
        "arch": parse_value(params.get("model.arch")) or "decoder",
        "diverged": str(tags.get(DIVERGED_TAG, "")).strip() not in FALSE_TAGS,
        "stopped_early": tags.get(STOPPED_EARLY_TAG, ""),
        "trial_id": tags.get("metalearner.trial_id", ""),
        "perturbations": tuple(perturbations_in(tags)),
    }
    for k, v in params.items():
        if k.startswith("controller."):
            row[k] = v
    # settings a population-based scheduler changed mid-run are logged as metrics: the last one wins
    for k, v in metrics.items():
        if k.startswith("controller."):
            before = parse_value(params.get(k))
            row[k] = str(int(v)) if isinstance(before, int) and float(v).is_integer() else repr(float(v))
    return row


def load_traces(tracking_uri: str, parent_run_id: str, keys: Iterable[str] = (*TRACE_KEYS, *REPORT_KEYS),
                max_workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every child run of a sweep and its per-step traces, as stored.

    Args:
        tracking_uri: MLflow tracking URI.
        parent_run_id: the sweep's parent run id.
        keys: metric keys to fetch (only those a run actually logged are requested), and
            always the settings in force (``controller.*`` metrics) a population logged.
        max_workers: threads fetching histories (see `TrackingReader.metric_points`).

    Returns:
        ``runs_df``: one row per child — run_id, run_name, arm, phase, seed, status,
        train_steps, seq_len, n_heads, n_global_heads, model_window, model_rope_base,
        arch (``model.arch``), diverged (tag ``metalearner.diverged`` set), stopped_early
        (the scheduler's tag, "" when not), duplicate_points (points stored beyond one per step per key),
        trial_id (the Tune trial), colour (its arm's ``#rrggbb``: the sweep's one palette,
        `sweep_arm_colours`), perturbations (the PBT/PB2 perturbations the run received, a
        tuple of `metalearner.tracking.lineage.Perturbation`; `perturbation_events`) and the raw
        ``controller.*`` param strings (a value a PBT scheduler changed is its last).
        ``traces_df``: long format — run_id, step, key, value; every stored point, ordered
        by run, key, step and write time (see `duplicate_points`).
    """
    reader = TrackingReader(tracking_uri)
    children = reader.trials(parent_run_id)
    rows = [_run_row(r) for r in children]
    try:
        order = str(reader.find_sweep(parent_run_id).data.tags.get("metalearner.arms", ""))
    except ValueError:  # a parent without the sweep tag: arms in name order
        order = ""
    palette = sweep_arm_colours(order, (r["arm"] for r in rows))
    for r in rows:
        r["colour"] = palette[r["arm"]]
    wanted = set(keys)
    jobs = [(r.info.run_id, k) for r in children
            for k in sorted(k for k in r.data.metrics if k in wanted or k.startswith(SETTING_PREFIX))]
    points = reader.metric_points(jobs, max_workers)
    traces = pd.DataFrame(points, columns=["run_id", "step", "key", "value", "timestamp"])
    traces = (traces.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
              .drop(columns="timestamp").reset_index(drop=True))
    traces["step"] = traces["step"].astype(int)
    traces["value"] = traces["value"].astype(float)

    extra = duplicate_points(traces).groupby("run_id")["extra_points"].sum()
    for r in rows:
        r["duplicate_points"] = int(extra.get(r["run_id"], 0))
    runs_df = pd.DataFrame(rows, columns=list(dict.fromkeys(
        RUN_COLUMNS + sorted({k for r in rows for k in r if k.startswith("controller.")}))))
    if not runs_df.empty:
        runs_df = runs_df.sort_values(["phase", "arm", "start_time"], kind="stable").reset_index(drop=True)
    return runs_df, traces


def duplicate_points(traces_df: pd.DataFrame) -> pd.DataFrame:
    """Where a trace holds more than one point for a step: one row per (run, key).

    Returns:
        Columns run_id, key, steps (how many steps were stored more than once),
        extra_points (points beyond one per step) and first_step; empty when every run
        has exactly one point per step per key, as the contract says.
    """
    counts = traces_df.groupby(["run_id", "key", "step"]).size()
    dup = counts[counts > 1].reset_index(name="n")
    if dup.empty:
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    out = dup.groupby(["run_id", "key"]).agg(steps=("step", "size"), extra_points=("n", "sum"),
                                             first_step=("step", "min")).reset_index()
    out["extra_points"] -= out["steps"]
    return out[DUPLICATE_COLUMNS]


def arm_palette(runs_df: pd.DataFrame) -> dict[str, str]:
    """arm -> ``#rrggbb`` of a sweep's runs (their ``colour`` column: the colours of the
    MLflow UI); for a frame without one, `sweep_arm_colours` in arm name order."""
    if "colour" in runs_df and runs_df["colour"].notna().all():
        return dict(zip(runs_df["arm"], runs_df["colour"], strict=True))
    return sweep_arm_colours("", set(runs_df["arm"]) if "arm" in runs_df else ())


def perturbation_events(runs_df: pd.DataFrame) -> pd.DataFrame:
    """The PBT/PB2 perturbations of a sweep's runs, read back from their tags: one row per
    run, perturbation and setting.

    Returns:
        Columns run_id, n (1 for a run's first), step (the first step with the new
        settings), donor_trial, donor_run, donor_step (the step of the donor's checkpoint
        copied), key, old (NaN if unknown), new; empty when nothing was perturbed.
    """
    rows = []
    if "perturbations" in runs_df:
        for rid, events in zip(runs_df["run_id"], runs_df["perturbations"], strict=True):
            for n, p in enumerate(events or (), 1):
                for key, old, new in p.settings or (("", None, math.nan),):
                    rows.append({"run_id": rid, "n": n, "step": p.step, "donor_trial": p.donor_trial,
                                 "donor_run": p.donor_run, "donor_step": p.donor_step, "key": key,
                                 "old": math.nan if old is None else old, "new": new})
    return pd.DataFrame(rows, columns=PERTURBATION_COLUMNS)


def one_point_per_step(traces_df: pd.DataFrame) -> pd.DataFrame:
    """``traces_df`` with one point per (run, key, step): the one written last."""
    return traces_df.drop_duplicates(["run_id", "key", "step"], keep="last")


def controller_settings(row: pd.Series) -> dict[str, Any]:
    """The ``controller.*`` settings of a run row, as values (name and nulls left out)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if not str(k).startswith("controller.") or k == "controller.name":
            continue
        val = parse_value(v)
        if val is None:
            continue
        out[str(k)[len("controller."):]] = val
    return out


def controller_summary(row: pd.Series) -> str:
    """``ewma(factor=1.005, beta=0.9, threshold=0.01)``; bounds left at their defaults are omitted."""
    name = parse_value(row.get("controller.name")) or "?"
    parts = []
    for k, v in sorted(controller_settings(row).items()):
        if k in BOUND_PARAMS and isinstance(v, (int, float)) and float(v) == BOUND_PARAMS[k].default:
            continue
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return f"{name}({', '.join(parts)})"


def run_summary(runs_df: pd.DataFrame, traces_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (indexed by run_id): last step and final/best val loss.

    Columns: arm, phase, seed, seq_len, n_heads, n_global_heads, train_steps (from
    ``runs_df``); last_step, complete (reached ``train.steps``, else the longest run of its
    phase), final_val_loss (val loss at the last eval step), best_val_loss. Each step
    counts once (`one_point_per_step`).
    """
    out = runs_df.set_index("run_id")[["arm", "phase", "seed", "seq_len", "n_heads", "n_global_heads",
                                       "train_steps"]].copy()
    t = one_point_per_step(traces_df)
    loss = t[t["key"] == "loss"].groupby("run_id")["step"].max()
    val = t[t["key"] == "val_loss"].sort_values(["run_id", "step"])
    out["last_step"] = loss.reindex(out.index)
    out["final_val_loss"] = val.groupby("run_id")["value"].last().reindex(out.index)
    out["best_val_loss"] = val.groupby("run_id")["value"].min().reindex(out.index)
    out["last_step"] = out["last_step"].fillna(val.groupby("run_id")["step"].max().reindex(out.index))
    expected = out["train_steps"].where(out["train_steps"].notna(), out.groupby("phase")["last_step"].transform("max"))
    out["complete"] = out["last_step"].notna() & (out["last_step"] >= expected)
    return out
