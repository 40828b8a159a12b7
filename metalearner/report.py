"""Read a sweep back from MLflow and say, honestly, which controller did better.

``metalearner compare NAME-or-run-id`` lands here. A sweep is an MLflow parent run
(tag ``metalearner.kind = "sweep"``) whose children are trials (tags ``metalearner.arm``,
``metalearner.phase`` = ``compare`` | ``search``, ``metalearner.seed``), each holding
the per-step traces of DESIGN.md (``loss``, ``loss_ewma``, ``rope_base``, ``window``,
``lr``, ``val_loss``).

Pipeline::

    find_sweep -> load_traces -> (runs_df, traces_df) -> compare_table -> render_table
                                                      -> plot_traces
                                                      -> export_best_controller
    write_report = all of it, written to a folder and logged back to the parent run.

Statistics. Each compare-phase arm is run once per seed at equal steps; seeds are the
unit of replication. Means carry a 95% t interval over seeds. An arm is compared with
the static baseline by the *paired* difference of final val loss over the seeds both
ran (same seed = same init and data order), with ``scipy.stats.ttest_rel``; the verdict
is "better"/"worse" only when the 95% CI of that paired difference excludes 0, and "no
clear difference" otherwise (including when fewer than two seeds pair up).

Imports mlflow lazily (inside functions) and never imports ray or torch. Plots use
matplotlib's object API with the Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

TRACE_KEYS = ("loss", "loss_ewma", "rope_base", "window", "lr", "val_loss")
KIND_TAG, ARM_TAG, PHASE_TAG, SEED_TAG = "metalearner.kind", "metalearner.arm", "metalearner.phase", "metalearner.seed"
PARENT_TAG = "mlflow.parentRunId"
BOUND_DEFAULTS = {"min_window": 1.0, "max_window": float(2**20), "min_base": 2.0, "max_base": 1e12}
NULLS = ("", "None", "none", "null", "Null", "NULL", "~")
TABLE_COLUMNS = [
    "arm", "phase", "controller", "n_seeds", "n_incomplete", "steps",
    "final_val_loss_mean", "final_val_loss_ci95", "best_val_loss_mean", "best_val_loss_ci95",
    "steps_to_static", "static_reached", "attention_cost",
    "vs_static_delta", "vs_static_ci95", "vs_static_n", "vs_static_p", "verdict", "run_ids",
]
HOW_TO_READ = (
    "How to read this table: each compare row is one arm run once per seed at equal steps; "
    "`a ± b` is the mean over seeds with the half-width of its 95% t confidence interval (blank for n < 2). "
    "`Δ vs static` is the mean paired difference of final val loss against the static arm over the seeds "
    "both ran (negative = lower loss = better), with its 95% CI; `p` is the paired t-test (scipy `ttest_rel`). "
    "The verdict is \"better\"/\"worse\" only when that CI excludes 0; otherwise \"no clear difference\" — "
    "no winner is declared within noise. `steps→static` is the mean first eval step at which val loss reached "
    "the static arm's mean final val loss (k/n seeds reached it); `attn cost` is the local-attention compute "
    "(sum over steps of min(window, seq_len)) relative to the static window. Search rows are single tuning "
    "trials (n = 1, configs differ): use them to read the search, not as evidence."
)

_RUN_ID = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------- finding and loading


def _client(tracking_uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def find_sweep(tracking_uri: str, name_or_run_id: str) -> Any:
    """The sweep's parent `mlflow.entities.Run`.

    Args:
        tracking_uri: MLflow tracking URI.
        name_or_run_id: a run id (32 hex chars; must be a sweep parent) or an experiment
            name (its most recently started sweep parent run is returned).

    Raises:
        ValueError: one line, when nothing matches or the run is not a sweep.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    key = str(name_or_run_id).strip()
    if _RUN_ID.fullmatch(key):
        try:
            run = client.get_run(key)
        except MlflowException:
            run = None
        if run is not None:
            kind = run.data.tags.get(KIND_TAG)
            if kind != "sweep":
                raise ValueError(f"compare: run {key} is not a sweep parent run "
                                 f"(tag {KIND_TAG}={kind!r}, expected 'sweep') in {tracking_uri}")
            return run
    exp = client.get_experiment_by_name(key)
    if exp is None:
        raise ValueError(f"compare: no experiment or sweep run named {key!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"compare: experiment {key!r} has no sweep run (tag {KIND_TAG}='sweep') in {tracking_uri}")
    return runs[0]


def _search_all(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _parse_value(text: Any) -> Any:
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


def _number(text: Any) -> float:
    v = _parse_value(text)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def _run_row(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    seed = _parse_value(tags.get(SEED_TAG, params.get("train.seed")))
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "arm": tags.get(ARM_TAG) or params.get("controller.name") or "?",
        "phase": tags.get(PHASE_TAG) or "compare",
        "seed": seed if isinstance(seed, int) else tags.get(SEED_TAG),
        "status": run.info.status,
        "start_time": run.info.start_time,
        "train_steps": _number(params.get("train.steps")),
        "seq_len": _number(params.get("train.seq_len")),
        "n_heads": _number(params.get("model.n_heads")),
        "n_global_heads": _number(params.get("model.n_global_heads")),
        "model_window": _number(params.get("model.window")),
        "model_rope_base": _number(params.get("model.rope_base")),
    }
    for k, v in params.items():
        if k.startswith("controller."):
            row[k] = v
    # settings a population-based scheduler changed mid-run are logged as metrics: the last one wins
    for k, v in metrics.items():
        if k.startswith("controller."):
            before = _parse_value(params.get(k))
            row[k] = str(int(v)) if isinstance(before, int) and float(v).is_integer() else repr(float(v))
    return row


def load_traces(tracking_uri: str, parent_run_id: str, keys: Iterable[str] = TRACE_KEYS,
                max_workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every child run of a sweep and its per-step traces.

    Args:
        tracking_uri: MLflow tracking URI.
        parent_run_id: the sweep's parent run id.
        keys: metric keys to fetch (only those a run actually logged are requested).
        max_workers: threads fetching histories; default 8 for a tracking server, 1 for a
            local store (SQLite reads gain nothing from threads).

    Returns:
        ``runs_df``: one row per child — run_id, run_name, arm, phase, seed, status,
        train_steps, seq_len, n_heads, n_global_heads, model_window, model_rope_base and
        the raw ``controller.*`` param strings (a value a PBT scheduler changed is its last).
        ``traces_df``: long format — run_id, step, key, value (one point per run, key, step).
    """
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = _search_all(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    children = [r for r in children if r.data.tags.get(KIND_TAG, "trial") == "trial"]
    rows = [_run_row(r) for r in children]
    runs_df = pd.DataFrame(rows, columns=list(dict.fromkeys(
        ["run_id", "run_name", "arm", "phase", "seed", "status", "start_time", "train_steps", "seq_len",
         "n_heads", "n_global_heads", "model_window", "model_rope_base"]
        + sorted({k for r in rows for k in r if k.startswith("controller.")}))))
    if not runs_df.empty:
        runs_df = runs_df.sort_values(["phase", "arm", "start_time"], kind="stable").reset_index(drop=True)

    wanted = set(keys)
    jobs = [(r.info.run_id, k) for r in children for k in sorted(wanted & set(r.data.metrics))]
    remote = tracking_uri.startswith(("http://", "https://", "databricks"))
    workers = max_workers or (8 if remote else 1)

    def fetch(job: tuple[str, str]) -> list[tuple[str, int, str, float, int]]:
        rid, key = job
        return [(rid, m.step, key, m.value, m.timestamp) for m in client.get_metric_history(rid, key)]

    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            chunks = list(pool.map(fetch, jobs))
    else:
        chunks = [fetch(j) for j in jobs]
    traces = pd.DataFrame([p for c in chunks for p in c], columns=["run_id", "step", "key", "value", "timestamp"])
    traces = (traces.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
              .drop_duplicates(["run_id", "key", "step"], keep="last")
              .drop(columns="timestamp").reset_index(drop=True))
    traces["step"] = traces["step"].astype(int)
    traces["value"] = traces["value"].astype(float)
    return runs_df, traces


# ---------------------------------------------------------------- statistics


def _ci95(values: Iterable[float]) -> float:
    """Half-width of the 95% t interval of the mean; NaN for fewer than two values."""
    from scipy import stats

    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(x) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def _mean(values: Iterable[float]) -> float:
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    return float(x.mean()) if len(x) else float("nan")


def _paired(a: pd.Series, b: pd.Series) -> tuple[float, float, int, float]:
    """Paired difference a - b over the common index: (mean, ci95 half-width, n, p)."""
    from scipy import stats

    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return float("nan"), float("nan"), 0, float("nan")
    d = (both["a"] - both["b"]).to_numpy(dtype=float)
    delta = float(d.mean())
    if n < 2:
        return delta, float("nan"), n, float("nan")
    if float(d.std(ddof=1)) == 0.0:  # identical differences: the t statistic is undefined
        return delta, 0.0, n, 1.0 if delta == 0 else 0.0
    p = float(stats.ttest_rel(both["a"], both["b"]).pvalue)
    return delta, _ci95(d), n, p


def _verdict(delta: float, ci: float) -> str:
    """Lower loss is better; a side is taken only when the 95% CI excludes 0."""
    if not (np.isfinite(delta) and np.isfinite(ci)):
        return "no clear difference"
    if delta + ci < 0:
        return "better"
    if delta - ci > 0:
        return "worse"
    return "no clear difference"


def _controller_settings(row: pd.Series) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if not str(k).startswith("controller.") or k == "controller.name":
            continue
        val = _parse_value(v)
        if val is None:
            continue
        out[str(k)[len("controller."):]] = val
    return out


def controller_summary(row: pd.Series) -> str:
    """``ewma(factor=1.005, beta=0.9, threshold=0.01)``; bounds left at their defaults are omitted."""
    name = _parse_value(row.get("controller.name")) or "?"
    parts = []
    for k, v in sorted(_controller_settings(row).items()):
        if k in BOUND_DEFAULTS and isinstance(v, (int, float)) and float(v) == BOUND_DEFAULTS[k]:
            continue
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return f"{name}({', '.join(parts)})"


def run_summary(runs_df: pd.DataFrame, traces_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (indexed by run_id): last step, final/best val loss, window sums.

    Columns: last_step, complete (reached ``train.steps``, else the longest run of its
    phase), final_val_loss (val loss at the last eval step), best_val_loss, window_first,
    window_used (sum over steps of min(window, seq_len)), window_steps.
    """
    out = runs_df.set_index("run_id")[["arm", "phase", "seed", "seq_len", "n_heads", "n_global_heads",
                                       "train_steps", "model_window"]].copy()
    t = traces_df
    loss = t[t["key"] == "loss"].groupby("run_id")["step"].max()
    val = t[t["key"] == "val_loss"].sort_values(["run_id", "step"])
    out["last_step"] = loss.reindex(out.index)
    out["final_val_loss"] = val.groupby("run_id")["value"].last().reindex(out.index)
    out["best_val_loss"] = val.groupby("run_id")["value"].min().reindex(out.index)
    out["last_step"] = out["last_step"].fillna(val.groupby("run_id")["step"].max().reindex(out.index))
    win = t[t["key"] == "window"].sort_values(["run_id", "step"]).join(out["seq_len"], on="run_id")
    win["used"] = np.fmin(win["value"], win["seq_len"].fillna(np.inf))
    out["window_first"] = win.groupby("run_id")["value"].first().reindex(out.index).fillna(out["model_window"])
    out["window_used"] = win.groupby("run_id")["used"].sum().reindex(out.index)
    out["window_steps"] = win.groupby("run_id")["used"].size().reindex(out.index)
    expected = out["train_steps"].where(out["train_steps"].notna(), out.groupby("phase")["last_step"].transform("max"))
    out["complete"] = out["last_step"].notna() & (out["last_step"] >= expected)
    return out


def _static_arm(runs_df: pd.DataFrame) -> str | None:
    compare = runs_df[runs_df["phase"] == "compare"]
    if "controller.name" not in compare:
        return None
    arms = sorted(set(compare.loc[compare["controller.name"] == "static", "arm"]))
    if not arms:
        return None
    return "static" if "static" in arms else arms[0]


def compare_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3) -> pd.DataFrame:
    """The comparison: one row per compare-phase arm, then the best search configurations.

    Args:
        runs_df, traces_df: from `load_traces`.
        top_search: how many search-phase configurations to list per searched arm.

    Returns:
        A DataFrame with the columns of ``TABLE_COLUMNS`` (see the module docstring and
        ``HOW_TO_READ``). Compare rows come first, sorted by ``final_val_loss_mean``; search
        rows (``phase == "search"``, one per distinct controller configuration, usually
        n = 1) follow, also sorted. Runs that stopped before ``train.steps`` are left out
        of the compare statistics and counted in ``n_incomplete``. The static arm's row
        has verdict ``"baseline"``; without a static arm the ``vs_static_*`` and
        ``steps_to_static`` columns are NaN and the verdict is ``"no static arm"``.
    """
    if runs_df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    summary = run_summary(runs_df, traces_df)
    runs = runs_df.set_index("run_id")
    summary["controller"] = [controller_summary(runs.loc[rid]) for rid in summary.index]
    static = _static_arm(runs_df)
    ok = summary[summary["complete"] & summary["final_val_loss"].notna()]

    static_runs = ok[(ok["phase"] == "compare") & (ok["arm"] == static)] if static else ok.iloc[:0]
    static_final = _mean(static_runs["final_val_loss"]) if static else float("nan")
    static_window = _mean(static_runs["window_first"]) if static else float("nan")
    static_by_seed = static_runs.groupby("seed")["final_val_loss"].mean()

    val = traces_df[traces_df["key"] == "val_loss"].sort_values(["run_id", "step"])
    reached: dict[str, float] = {}
    if np.isfinite(static_final):
        hit = val[val["value"] <= static_final].groupby("run_id")["step"].min()
        reached = {rid: float(s) for rid, s in hit.items()}

    def cost(rid: str) -> float:
        r = summary.loc[rid]
        if np.isfinite(r["n_heads"]) and r["n_heads"] == r["n_global_heads"]:
            return float("nan")  # no local heads: the window costs nothing
        ref = static_window if np.isfinite(static_window) else r["window_first"]
        ref = min(ref, r["seq_len"]) if np.isfinite(r["seq_len"]) else ref
        if not (np.isfinite(ref) and ref > 0 and r["window_steps"] and np.isfinite(r["window_used"])):
            return float("nan")
        return float(r["window_used"] / (r["window_steps"] * ref))

    def row(arm: str, phase: str, group: pd.DataFrame, n_incomplete: int) -> dict[str, Any]:
        rids = list(group.index)
        hits = [reached[r] for r in rids if r in reached]
        controllers = sorted(set(group["controller"]))
        out: dict[str, Any] = {
            "arm": arm, "phase": phase,
            "controller": controllers[0] if len(controllers) == 1 else " | ".join(controllers),
            "n_seeds": len(rids), "n_incomplete": n_incomplete,
            "steps": int(group["last_step"].max()) if len(group) else 0,
            "final_val_loss_mean": _mean(group["final_val_loss"]),
            "final_val_loss_ci95": _ci95(group["final_val_loss"]),
            "best_val_loss_mean": _mean(group["best_val_loss"]),
            "best_val_loss_ci95": _ci95(group["best_val_loss"]),
            "steps_to_static": _mean(hits) if static else float("nan"),
            "static_reached": f"{len(hits)}/{len(rids)}" if static else "",
            "attention_cost": _mean([cost(r) for r in rids]),
            "run_ids": ",".join(rids),
        }
        if static is None:
            delta, ci, n, p, verdict = float("nan"), float("nan"), 0, float("nan"), "no static arm"
        elif phase == "compare" and arm == static:
            delta, ci, n, p, verdict = 0.0, float("nan"), len(rids), float("nan"), "baseline"
        else:
            delta, ci, n, p = _paired(group.groupby("seed")["final_val_loss"].mean(), static_by_seed)
            verdict = _verdict(delta, ci)
        out.update(vs_static_delta=delta, vs_static_ci95=ci, vs_static_n=n, vs_static_p=p, verdict=verdict)
        return out

    rows = []
    compare_all = summary[summary["phase"] == "compare"]
    for arm in sorted(set(compare_all["arm"])):
        grp = ok[(ok["phase"] == "compare") & (ok["arm"] == arm)]
        n_bad = int(((compare_all["arm"] == arm) & ~compare_all.index.isin(ok.index)).sum())
        rows.append(row(arm, "compare", grp, n_bad))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("final_val_loss_mean", kind="stable")

    search_rows = []
    search_all = summary[summary["phase"] != "compare"]
    for (phase, arm), grp_all in search_all.groupby(["phase", "arm"], sort=True):
        grp = ok[ok.index.isin(grp_all.index)]
        if grp.empty:  # every trial stopped early (e.g. ASHA with no finisher): show what there is
            grp = grp_all[grp_all["final_val_loss"].notna()]
        configs = [row(arm, phase, g, 0) for _, g in grp.groupby("controller", sort=True)]
        configs.sort(key=lambda r: (not np.isfinite(r["final_val_loss_mean"]), r["final_val_loss_mean"]))
        search_rows += configs[:top_search]
    if search_rows:
        extra = pd.DataFrame(search_rows, columns=TABLE_COLUMNS).sort_values("final_val_loss_mean", kind="stable")
        table = pd.concat([table, extra], ignore_index=True) if len(table) else extra
    return table.reset_index(drop=True)


# ---------------------------------------------------------------- text


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    return format(x, spec)


def _pm(mean: float, ci: float, spec: str = ".4f") -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:{spec}} ± {ci:.4f}" if np.isfinite(ci) else f"{mean:{spec}}"


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """The table with its numbers formatted for reading (strings only)."""
    rows = []
    for _, r in df.iterrows():
        n, k = r["n_seeds"], str(r["static_reached"])
        if not k:
            to_static = ""
        elif k.startswith("0/"):
            to_static = "never"
        else:
            to_static = f"{r['steps_to_static']:.0f}" + ("" if k == f"{n}/{n}" else f" ({k})")
        verdict = r["verdict"]
        if r["phase"] != "compare" and verdict == "no clear difference" and r["vs_static_n"] < 2:
            verdict = "n/a (n=1)" if n == 1 else verdict
        rows.append({
            "arm": r["arm"] if r["phase"] == "compare" else f"{r['arm']} [{r['phase']}]",
            "controller": r["controller"],
            "n": f"{n}" + (f" (+{r['n_incomplete']} cut)" if r["n_incomplete"] else ""),
            "final val loss": _pm(r["final_val_loss_mean"], r["final_val_loss_ci95"]),
            "best val loss": _pm(r["best_val_loss_mean"], r["best_val_loss_ci95"]),
            "steps→static": to_static,
            "attn cost": _fmt(r["attention_cost"], ".2f"),
            "Δ vs static": "" if r["verdict"] == "baseline" else _pm(r["vs_static_delta"], r["vs_static_ci95"], "+.4f"),
            "p": _fmt(r["vs_static_p"], ".3g"),
            "verdict": verdict,
        })
    cols = ["arm", "controller", "n", "final val loss", "best val loss", "steps→static", "attn cost",
            "Δ vs static", "p", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def render_table(df: pd.DataFrame) -> str:
    """A fixed-width text table for the terminal (``1.2345 ± 0.0123`` etc.)."""
    if df.empty:
        return "(no finished trials)"
    disp = _display(df)
    text_cols = ("arm", "controller", "verdict")
    for c in disp:  # pad to one width per column: text left-aligned, numbers right-aligned
        width = max(len(c), *(len(v) for v in disp[c]))
        disp[c] = [v.ljust(width) if c in text_cols else v.rjust(width) for v in disp[c]]
    return disp.to_string(index=False, justify="left")


def render_markdown(df: pd.DataFrame) -> str:
    """The same table as GitHub markdown (no tabulate needed)."""
    disp = _display(df)
    head = "| " + " | ".join(disp.columns) + " |"
    rule = "| " + " | ".join("---" for _ in disp.columns) + " |"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in disp.itertuples(index=False)]
    return "\n".join([head, rule, *body])


# ---------------------------------------------------------------- plots


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _colours(arms: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_traces(runs_df: pd.DataFrame, traces_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """PNG plots of a sweep: ``rope_base.png``, ``window.png``, ``loss.png`` and, when the
    sweep searched, ``search.png``.

    Knob traces draw one thin line per seed, one colour per arm (compare phase; all runs
    when there is no compare phase; runs cut before ``train.steps`` are left out, as in
    the table). ``loss.png`` shows each arm's EWMA-smoothed training
    loss averaged over seeds, with its mean val loss as markers. ``search.png`` plots each
    search trial's final val loss against the controller setting that varied most
    (``controller.factor`` when it varies); trials a scheduler stopped early are hollow.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if runs_df.empty:
        return []
    summary = run_summary(runs_df, traces_df)
    runs = runs_df[runs_df["phase"] == "compare"]
    if runs.empty:
        runs = runs_df
    complete = runs[runs["run_id"].map(summary["complete"]).astype(bool)]
    runs = complete if len(complete) else runs  # runs cut before train.steps would skew the means
    arms = sorted(set(runs["arm"]))
    colour = _colours(arms)
    arm_of = runs.set_index("run_id")["arm"]
    t = traces_df[traces_df["run_id"].isin(arm_of.index)].sort_values(["run_id", "step"])
    written = []

    for key, ylabel, log in (("rope_base", "RoPE base", True), ("window", "local window (keys)", False)):
        fig, ax = _figure(f"{key} per step (one line per seed)", "optimizer step", ylabel)
        seen: set[str] = set()
        for rid, g in t[t["key"] == key].groupby("run_id", sort=False):
            arm = arm_of[rid]
            ax.plot(g["step"], g["value"], color=colour[arm], lw=0.9, alpha=0.75,
                    label=None if arm in seen else arm)
            seen.add(arm)
        if key == "window":
            seq = runs["seq_len"].dropna()
            if len(seq):
                ax.axhline(float(seq.max()), color="grey", ls="--", lw=0.8, label="seq_len")
        if log and seen:
            ax.set_yscale("log")
        if seen:
            ax.legend(title="arm", fontsize=8)
        written.append(_save(fig, out / f"{key}.png"))

    fig, ax = _figure("training loss (EWMA-smoothed, mean over seeds) and val loss", "optimizer step", "loss")
    any_line = False
    for arm in arms:
        ids = list(arm_of.index[arm_of == arm])
        tr = t[(t["key"] == "loss") & t["run_id"].isin(ids)]
        if len(tr):
            span = max(2, int(tr["step"].max()) // 25)
            smooth = tr.groupby("run_id", group_keys=False)["value"].transform(lambda s, span=span: s.ewm(span=span).mean())
            mean = smooth.groupby(tr["step"]).mean()
            ax.plot(mean.index, mean.values, color=colour[arm], lw=1.2, label=f"{arm} train")
            any_line = True
        va = t[(t["key"] == "val_loss") & t["run_id"].isin(ids)].groupby("step")["value"].mean()
        if len(va):
            ax.plot(va.index, va.values, color=colour[arm], marker="o", ms=4, ls=":", lw=0.8, label=f"{arm} val")
            any_line = True
    if any_line:
        ax.legend(fontsize=8, ncol=2)
    written.append(_save(fig, out / "loss.png"))

    search = runs_df[runs_df["phase"] == "search"]
    if len(search):
        final = (traces_df[(traces_df["key"] == "val_loss") & traces_df["run_id"].isin(search["run_id"])]
                 .sort_values("step").groupby("run_id")["value"].last())
        settings = search.set_index("run_id")[[c for c in search if c.startswith("controller.")]].map(_number)
        varying = [c for c in settings if settings[c].nunique(dropna=True) > 1]
        xkey = "controller.factor" if "controller.factor" in varying else (varying[0] if varying else None)
        if xkey is not None and len(final):
            fig, ax = _figure(f"search trials: final val loss vs {xkey}", xkey, "final val loss")
            s_colour = _colours(sorted(set(search["arm"])))
            cut_label = "stopped early (final val loss at an earlier step)"
            for arm, g in search.groupby("arm"):
                ids = [r for r in g["run_id"] if r in final.index]
                done = [r for r in ids if summary.loc[r, "complete"]]
                cut = [r for r in ids if not summary.loc[r, "complete"]]
                ax.scatter(settings.loc[done, xkey], final[done], color=s_colour[arm], s=22, label=arm)
                if cut:
                    ax.scatter(settings.loc[cut, xkey], final[cut], facecolors="none", edgecolors=s_colour[arm],
                               s=22, label=cut_label)
                    cut_label = None
            xs = settings[xkey].dropna()
            if len(xs) and (xs > 0).all() and xs.max() / xs.min() > 20:
                ax.set_xscale("log")
            ax.legend(title="arm", fontsize=8)
            written.append(_save(fig, out / "search.png"))
    return written


# ---------------------------------------------------------------- exports


def _best_run(runs_df: pd.DataFrame, traces_df: pd.DataFrame, arm: str | None) -> pd.Series:
    summary = run_summary(runs_df, traces_df)
    done = summary[summary["final_val_loss"].notna()]
    if arm is None:
        table = compare_table(runs_df, traces_df, top_search=0)
        table = table[(table["phase"] == "compare") & table["final_val_loss_mean"].notna()]
        if table.empty:
            raise ValueError("export: no compare-phase arm has a final val_loss")
        best_arm = table.iloc[0]["arm"]
        grp = done[(done["phase"] == "compare") & (done["arm"] == best_arm) & done["complete"]]
        if grp.empty:
            grp = done[(done["phase"] == "compare") & (done["arm"] == best_arm)]
    else:
        known = sorted(set(runs_df["arm"]))
        if arm not in known:
            raise ValueError(f"export: arm: got {arm!r}, expected one of {known}")
        grp = done[(done["arm"] == arm) & (done["phase"] == "search")]
        if grp.empty:  # the arm was not searched: its compare configuration
            grp = done[done["arm"] == arm]
        if grp.empty:
            raise ValueError(f"export: arm {arm!r} has no run with a final val_loss")
        if grp["complete"].any():
            grp = grp[grp["complete"]]
    rid = grp["final_val_loss"].idxmin()
    return runs_df.set_index("run_id").loc[rid]


def export_best_controller(runs_df: pd.DataFrame, traces_df: pd.DataFrame, path: str | Path,
                           arm: str | None = None) -> dict[str, Any]:
    """Write the best configuration as a YAML controller spec (``--controller-spec``).

    Args:
        runs_df, traces_df: from `load_traces`.
        path: YAML file to write.
        arm: None = the compare-phase arm with the lowest mean final val loss (its
            configuration); an arm name = that arm's best search trial (lowest final val
            loss), or its compare configuration if it was not searched.

    Returns:
        ``{"controller": {"name": ..., <settings>}}`` as written; values are numbers again
        and unset (None/null) settings are dropped.
    """
    run = _best_run(runs_df, traces_df, arm)
    spec: dict[str, Any] = {"name": _parse_value(run.get("controller.name")) or "static"}
    for key, value in sorted(_controller_settings(run).items()):
        node = spec
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    doc = {"controller": spec}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


# ---------------------------------------------------------------- the whole report


@dataclass
class Report:
    """What `write_report` produced."""

    parent_run_id: str
    table: pd.DataFrame
    text: str
    files: list[Path] = field(default_factory=list)
    experiment: str = ""


def write_report(tracking_uri: str, name_or_run_id: str, out_dir: str | Path,
                 log_to_mlflow: bool = True) -> Report:
    """Find a sweep, build its comparison and plots, write them to ``out_dir`` and (by
    default) log them as artifacts of the sweep's parent run under ``report/``.

    Files: ``comparison.csv`` (the full table), ``comparison.md`` (markdown table + how to
    read it), ``best_controller.yaml`` (when an arm has a final val loss) and the plots.
    """
    client = _client(tracking_uri)
    parent = find_sweep(tracking_uri, name_or_run_id)
    pid = parent.info.run_id
    experiment = client.get_experiment(parent.info.experiment_id).name
    runs_df, traces_df = load_traces(tracking_uri, pid)
    table = compare_table(runs_df, traces_df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_cmp = int((runs_df["phase"] == "compare").sum()) if len(runs_df) else 0
    header = (f"sweep {experiment!r} (parent run {pid}): {len(runs_df)} trials, "
              f"{n_cmp} in the equal-steps comparison")
    text = "\n".join([header, "", render_table(table), "", HOW_TO_READ])

    files = []
    csv = out / "comparison.csv"
    table.to_csv(csv, index=False)
    md = out / "comparison.md"
    md.write_text(f"# Sweep `{experiment}`\n\nParent run `{pid}` in `{tracking_uri}`: {len(runs_df)} trials, "
                  f"{n_cmp} in the equal-steps comparison.\n\n{render_markdown(table)}\n\n{HOW_TO_READ}\n")
    files += [csv, md]
    if (table["phase"] == "compare").any() and table["final_val_loss_mean"].notna().any():
        best = out / "best_controller.yaml"
        export_best_controller(runs_df, traces_df, best)
        files.append(best)
    files += plot_traces(runs_df, traces_df, out)
    if log_to_mlflow:
        for f in files:
            client.log_artifact(pid, str(f), "report")
    return Report(parent_run_id=pid, table=table, text=text, files=files, experiment=experiment)
