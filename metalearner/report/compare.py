"""The comparison: one row per compare-phase arm, then the best search configurations.

Each compare-phase arm is run once per seed at equal steps. For the spec's metric (the
final value of its trace; ``val_loss`` by default, ``mode`` min/max) an arm's row carries
the mean with its 95% t interval and percentile-bootstrap interval, the IQM where n >= 5,
and the paired comparison with the static arm: Holm-corrected over the arms
(`metalearner.report.stats.compare_with_baseline`, the report's only verdict rule), with
the minimum detectable effect as one sentence under the table. Diverged runs (tag
``metalearner.diverged``) and runs that failed, were cut before ``train.steps`` or have no
value of the metric are counted per arm and shown, never dropped silently; an arm none of
whose runs finished is a row that says so, with no verdict.

Search rows are shown without a verdict: each is one tuning trial (n = 1), picked as one of
the best of its search, on the tuning seed; a test of a row chosen for looking good is
biased toward "better" (and one pair cannot be tested anyway). They show the search, not
evidence; the arm's compare row, re-run on fresh seeds, carries the verdict.

Compute to target: per arm (finished and diverged runs), the attention compute (query-key
pairs of the local-window band, `stats.attention_cost`: the report's one measure of
attention cost, summed over steps) and the training seconds until val loss first reaches
the target: the spec's ``target_loss``, else static's final val loss (``baseline_target``,
the worst static seed, so every static seed reaches it), with bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from metalearner.report import stats
from metalearner.report.runs import controller_summary, one_point_per_step, run_summary

TABLE_COLUMNS = [
    "arm", "phase", "controller", "n_seeds", "n_incomplete", "steps",
    "final_val_loss_mean", "final_val_loss_ci95", "best_val_loss_mean", "best_val_loss_ci95",
    "steps_to_static", "static_reached",
    "vs_static_delta", "vs_static_ci95", "vs_static_p", "verdict", "run_ids",
    # the spec's metric (final value per run) with its intervals, and the run counts
    "metric", "n_runs", "n_finished", "n_diverged", "value_mean", "value_ci95", "value_boot_low",
    "value_boot_high", "value_iqm", "value_iqm_low", "value_iqm_high",
    "vs_static_boot_low", "vs_static_boot_high", "vs_static_p_holm", "mde", "n_paired", "n_missing",
    "n_lost", "n_won",
    # compute to the target loss (n_to_target: the finished and diverged runs it counts)
    "n_to_target", "n_reached", "attention_to_target", "attention_to_target_low", "attention_to_target_high",
    "attention_rel", "attention_rel_low", "attention_rel_high", "seconds_to_target", "seconds_to_target_low",
    "seconds_to_target_high", "seconds_rel", "seconds_rel_low", "seconds_rel_high",
]
N_BOOT = 2_000  # bootstrap resamples per interval: enough for 95% ends at a few seeds, fast
NO_STATIC = "no static arm"  # the compare rows' verdict when there is nothing to test against
# where compare_sweep takes each compare row's numbers from: table column <- source column
ARM_COLUMNS = {  # stats.count_runs + stats.summarize_arm (with or without a static arm)
    "n_runs": "n_runs", "n_finished": "n_finished", "n_diverged": "n_diverged", "n_incomplete": "n_incomplete",
    "value_mean": "mean", "value_ci95": "t_ci95", "value_boot_low": "boot_low", "value_boot_high": "boot_high",
    "value_iqm": "iqm", "value_iqm_low": "iqm_low", "value_iqm_high": "iqm_high"}
VS_STATIC_COLUMNS = {  # stats.compare_with_baseline: the paired test, Holm and the verdict
    "vs_static_delta": "delta", "vs_static_ci95": "ci95", "vs_static_p": "p", "vs_static_boot_low": "delta_boot_low",
    "vs_static_boot_high": "delta_boot_high", "vs_static_p_holm": "p_holm", "mde": "mde", "n_paired": "n_paired",
    "n_missing": "n_missing", "n_lost": "n_lost", "n_won": "n_won", "verdict": "verdict"}
TO_TARGET_COLUMNS = {  # stats.compute_to_target's per-arm frame
    "n_to_target": "n_runs", "n_reached": "n_reached", "attention_to_target": "attention_mean",
    "attention_to_target_low": "attention_low", "attention_to_target_high": "attention_high",
    "attention_rel": "attention_rel", "attention_rel_low": "attention_rel_low",
    "attention_rel_high": "attention_rel_high", "seconds_to_target": "seconds_mean",
    "seconds_to_target_low": "seconds_low", "seconds_to_target_high": "seconds_high", "seconds_rel": "seconds_rel",
    "seconds_rel_low": "seconds_rel_low", "seconds_rel_high": "seconds_rel_high"}


@dataclass
class Comparison:
    """What `compare_sweep` found.

    Args:
        table: one row per arm (``TABLE_COLUMNS``).
        metric, lower_is_better: the compared metric and its direction.
        mde_sentence: "with n=2 seeds, differences in val_loss under 0.41 cannot be detected (...)".
        target: the val loss of compute-to-target (NaN when there is none).
        target_source: "target_loss in the spec" | "static's final val loss (worst seed)" | "".
        verdicts: one line per compared arm, verdict first (for the parent run's description).
        per_run_to_target: `stats.compute_to_target`'s per-run frame.
    """

    table: pd.DataFrame
    metric: str = "val_loss"
    lower_is_better: bool = True
    mde_sentence: str = ""
    target: float = float("nan")
    target_source: str = ""
    verdicts: list[str] = field(default_factory=list)
    per_run_to_target: pd.DataFrame = field(default_factory=pd.DataFrame)


def _static_arm(runs_df: pd.DataFrame) -> str | None:
    compare = runs_df[runs_df["phase"] == "compare"]
    if "controller.name" not in compare:
        return None
    arms = sorted(set(compare.loc[compare["controller.name"] == "static", "arm"]))
    if not arms:
        return None
    return "static" if "static" in arms else arms[0]


def compare_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3,
                  metric: str = "val_loss", mode: str = "min", target_loss: float | None = None) -> pd.DataFrame:
    """`compare_sweep`'s table (see there)."""
    return compare_sweep(runs_df, traces_df, top_search, metric, mode, target_loss).table


def _base_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3) -> pd.DataFrame:
    """The rows of the comparison before the statistics: one per compare-phase arm, then
    the best search configurations.

    Args:
        runs_df, traces_df: from `load_traces` (a step stored twice counts once: its last point).
        top_search: how many search-phase configurations to list per searched arm.

    Returns:
        A DataFrame with the descriptive columns of ``TABLE_COLUMNS`` (arm .. run_ids; the
        ``vs_static_*`` columns NaN: `compare_sweep` fills them for compare rows). Compare
        rows come first, sorted by ``final_val_loss_mean``; search rows (``phase ==
        "search"``, one per distinct controller configuration, usually n = 1) follow, also
        sorted. Runs that stopped before ``train.steps`` are left out of the compare
        statistics and counted in ``n_incomplete``. Verdicts: "" for search rows (never
        tested), ``NO_STATIC`` for compare rows when there is no static arm, else "" until
        `compare_sweep` sets them.
    """
    if runs_df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    traces_df = one_point_per_step(traces_df)
    summary = run_summary(runs_df, traces_df)
    runs = runs_df.set_index("run_id")
    summary["controller"] = [controller_summary(runs.loc[rid]) for rid in summary.index]
    static = _static_arm(runs_df)
    ok = summary[summary["complete"] & summary["final_val_loss"].notna()]

    static_runs = ok[(ok["phase"] == "compare") & (ok["arm"] == static)] if static else ok.iloc[:0]
    static_final = stats.mean(static_runs["final_val_loss"]) if static else float("nan")

    val = traces_df[traces_df["key"] == "val_loss"].sort_values(["run_id", "step"])
    reached: dict[str, float] = {}
    if np.isfinite(static_final):
        hit = val[val["value"] <= static_final].groupby("run_id")["step"].min()
        reached = {rid: float(s) for rid, s in hit.items()}

    def row(arm: str, phase: str, group: pd.DataFrame, n_incomplete: int) -> dict[str, Any]:
        rids = list(group.index)
        hits = [reached[r] for r in rids if r in reached]
        everyone = summary[(summary["arm"] == arm) & (summary["phase"] == phase)]  # a failed arm has no group
        controllers = sorted(set(group["controller"] if len(group) else everyone["controller"]))
        controllers = [c for c in controllers if not c.startswith("?(")] or controllers  # runs without params
        return {
            "arm": arm, "phase": phase,
            "controller": controllers[0] if len(controllers) == 1 else " | ".join(controllers),
            "n_seeds": len(rids), "n_incomplete": n_incomplete,
            "steps": int(group["last_step"].max()) if len(group) else 0,
            "final_val_loss_mean": stats.mean(group["final_val_loss"]),
            "final_val_loss_ci95": stats.ci95(group["final_val_loss"]),
            "best_val_loss_mean": stats.mean(group["best_val_loss"]),
            "best_val_loss_ci95": stats.ci95(group["best_val_loss"]),
            "steps_to_static": stats.mean(hits) if static else float("nan"),
            "static_reached": f"{len(hits)}/{len(rids)}" if static else "",
            "verdict": NO_STATIC if phase == "compare" and static is None else "",
            "run_ids": ",".join(rids),
        }

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


# ---------------------------------------------------------------- statistics and compute


def run_status(runs_df: pd.DataFrame, traces_df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """One row per run: arm, phase, seed, value (final value of ``metric``) and status.

    Status: ``diverged`` (tag ``metalearner.diverged``), else ``incomplete`` (stopped before
    ``train.steps``, or no finite final value of the metric), else ``finished``.
    """
    t = one_point_per_step(traces_df)
    summary = run_summary(runs_df, t)
    last = (t[t["key"] == metric].sort_values(["run_id", "step"]).groupby("run_id")["value"].last()
            .reindex(summary.index))
    diverged = runs_df.set_index("run_id")["diverged"].reindex(summary.index).fillna(False).astype(bool) \
        if "diverged" in runs_df else pd.Series(False, index=summary.index)
    ok = summary["complete"] & np.isfinite(last.astype(float))
    status = np.where(diverged, "diverged", np.where(ok, "finished", "incomplete"))
    return pd.DataFrame({"run_id": summary.index, "arm": summary["arm"].to_numpy(), "phase": summary["phase"].to_numpy(),
                         "seed": summary["seed"].to_numpy(), "value": last.to_numpy(dtype=float),
                         "status": status}).reset_index(drop=True)


def _target(status: pd.DataFrame, static: str | None, target_loss: float | None,
            traces_df: pd.DataFrame) -> tuple[float, str]:
    if target_loss is not None:
        return float(target_loss), "target_loss in the spec"
    if static is None:
        return float("nan"), ""
    ok = status[(status["arm"] == static) & (status["phase"] == "compare") & (status["status"] == "finished")]
    val = one_point_per_step(traces_df)
    val = val[(val["key"] == "val_loss") & val["run_id"].isin(ok["run_id"])].sort_values("step")
    finals = val.groupby("run_id")["value"].last()
    if finals.empty:
        return float("nan"), ""
    return stats.baseline_target(finals, "max"), f"{static}'s final val loss (worst of {len(finals)} seed(s))"


def to_target(runs_df: pd.DataFrame, traces_df: pd.DataFrame, run_ids: list[str], target: float,
              baseline: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Attention compute and training seconds to ``target`` of the given runs, per run and per arm.

    Args:
        runs_df, traces_df: from `load_traces`.
        run_ids: the runs to count (runs without the model's shape params are left out).
        target: the val loss to reach; NaN gives empty frames.
        baseline: the arm the relative columns divide by (None: no relative columns).

    Returns:
        `stats.compute_to_target`'s ``(per_run, per_arm)``; two empty frames when no run
        qualifies.
    """
    runs = runs_df[runs_df["run_id"].isin(run_ids)].copy()
    shape = ["seq_len", "n_heads", "n_global_heads"]
    runs = runs[np.isfinite(runs[shape].astype(float)).all(axis=1)]
    if runs.empty or not np.isfinite(target):
        return pd.DataFrame(), pd.DataFrame()
    arch = runs["arch"] if "arch" in runs else pd.Series("decoder", index=runs.index)
    runs["causal"] = arch.fillna("decoder").ne("encoder_decoder")  # the window bounds the encoder's attention there
    return stats.compute_to_target(runs[["run_id", "arm", "seed", *shape, "causal"]], one_point_per_step(traces_df),
                                   target, baseline=baseline, n_boot=N_BOOT)


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _count(x: Any) -> int:
    """A count from the table (NaN where the column was never filled) as an int."""
    return int(x) if isinstance(x, (int, float, np.integer, np.floating)) and np.isfinite(x) else 0


def _compute_clause(r: pd.Series, static: str) -> str:
    """What a compare row's compute to target says, relative to ``static`` ("" when nothing)."""
    n_to, n_hit = _count(r.get("n_to_target")), _count(r.get("n_reached"))
    rel, lo, hi = r.get("attention_rel", np.nan), r.get("attention_rel_low", np.nan), r.get("attention_rel_high", np.nan)
    if n_to == 0:
        return ""
    if n_hit == 0:
        return "; never reached the target"
    if n_hit < n_to:
        return f"; only {n_hit}/{n_to} runs reached the target"
    if not np.isfinite(rel):
        return f"; reached the target on {n_hit}/{n_to} runs, {static} did not on every seed"
    if np.isfinite(hi) and hi < 1:
        return f"; reaches the target with {_pct(1 - rel)} less attention compute (95% CI {_pct(1 - hi)}–{_pct(1 - lo)})"
    if np.isfinite(lo) and lo > 1:
        return (f"; needs {_pct(rel - 1)} more attention compute to reach the target (95% CI {_pct(lo - 1)}–"
                f"{_pct(hi - 1) if np.isfinite(hi) else '∞'})")
    if np.isfinite(lo):
        return f"; attention compute to target {rel:.2f}× {static} (95% CI {lo:.2f}–{hi:.2f}×: no clear difference)"
    return f"; attention compute to target {rel:.2f}× {static}"


def verdict_line(r: pd.Series, metric: str, static: str) -> str:
    """One line per compared arm: the verdict, the difference, and the compute to target.

    Args:
        r: a compare row of the table.
        metric: the compared metric's name.
        static: the baseline arm.

    Returns:
        e.g. "ewma vs static: better (Δ val_loss -0.3, Holm p=0.0011, n=3); reaches the
        target with 29% less attention compute (95% CI 19%–50%)", or "ewma vs static: no
        verdict: all 3 runs failed" for an arm none of whose runs finished. Never raises on
        NaN counts (failed, missing or diverged runs).
    """
    counts = [f"{_count(r.get(c))} {w}" for c, w in (("n_diverged", "diverged"), ("n_incomplete", "incomplete"))
              if _count(r.get(c))]
    tail = " [" + ", ".join(counts) + "]" if counts else ""
    head = f"{r['arm']} vs {static}: {r['verdict']}"
    if str(r["verdict"]).startswith("no verdict"):
        return head + tail
    d, p = r.get("vs_static_delta", np.nan), r.get("vs_static_p_holm", np.nan)
    line = head + (f" (Δ {metric} {d:+.4g}" if np.isfinite(d) else " (no paired seeds")
    if np.isfinite(p):
        line += f", Holm p={p:.2g}"
    return line + f", n={_count(r.get('n_paired'))})" + tail + _compute_clause(r, static)


def compare_sweep(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3, metric: str = "val_loss",
                  mode: str = "min", target_loss: float | None = None) -> Comparison:
    """The comparison of a sweep, statistics and compute to target included.

    Args:
        runs_df, traces_df: from `load_traces` (a step stored twice counts once: its last point).
        top_search: how many search-phase configurations to list per searched arm.
        metric: the spec's metric; each run's value is the last point of its trace.
        mode: "min" (lower is better) or "max".
        target_loss: the spec's ``target_loss``; None: static's final val loss.

    Returns:
        A `Comparison`. Its table has ``TABLE_COLUMNS``: compare rows first (sorted by
        ``value_mean``, best first), then search rows (single trials, n = 1, never tested:
        verdict "" and NaN ``vs_static_*``). The static arm's row has verdict
        ``"baseline"``; an arm none of whose runs finished has "no verdict: all N runs
        failed" (or diverged); without a static arm the ``vs_static_*`` columns are NaN and
        the verdict is ``"no static arm"``. Never raises on failed, missing or diverged runs.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode: got {mode!r}, expected 'min' or 'max'")
    lower = mode == "min"
    base = _base_table(runs_df, traces_df, top_search)
    for c in TABLE_COLUMNS:
        if c not in base:
            base[c] = np.nan
    base["metric"] = metric
    if runs_df.empty:
        return Comparison(base[TABLE_COLUMNS], metric, lower)
    status = run_status(runs_df, traces_df, metric)
    static = _static_arm(runs_df)
    cmp_rows = status[status["phase"] == "compare"]
    out = Comparison(base, metric, lower)
    if not cmp_rows.empty:
        if static is not None and static in set(cmp_rows["arm"]):
            st, out.mde_sentence = stats.compare_with_baseline(cmp_rows, static, lower_is_better=lower,
                                                               metric=metric, n_boot=N_BOOT)
        else:
            counts = stats.count_runs(cmp_rows)
            st = counts.join(pd.DataFrame([{"arm": a, **asdict(stats.summarize_arm(
                cmp_rows.loc[(cmp_rows["arm"] == a) & (cmp_rows["status"] == "finished"), "value"], N_BOOT))}
                for a in counts.index]).set_index("arm"))
        out.target, out.target_source = _target(status, static, target_loss, traces_df)
        # runs cut short (failure, interrupt) are left out here as in the statistics (counted in
        # n_incomplete); a diverged run stays: if it never got to the target, its cost is +inf
        counted = cmp_rows[cmp_rows["status"].isin(["finished", "diverged"])]
        per_run, per_arm = to_target(runs_df, traces_df, list(counted["run_id"]), out.target, static)
        out.per_run_to_target = per_run
        is_cmp = base["phase"] == "compare"
        _fill(base, is_cmp, st, ARM_COLUMNS)
        if "verdict" in st:
            _fill(base, is_cmp, st, VS_STATIC_COLUMNS)
            is_static = is_cmp & (base["arm"] == static)
            base.loc[is_static, "n_paired"] = base.loc[is_static, "n_finished"]
        _fill(base, is_cmp, per_arm, TO_TARGET_COLUMNS)
        cmp_part = base[is_cmp].copy()
        key = cmp_part["value_mean"] if lower else -cmp_part["value_mean"]
        cmp_part = cmp_part.assign(_k=key).sort_values("_k", kind="stable", na_position="last").drop(columns="_k")
        base = pd.concat([cmp_part, base[~is_cmp]], ignore_index=True)
        if static is not None:
            compared = base[(base["phase"] == "compare") & (base["verdict"] != "baseline")]
            out.verdicts = [verdict_line(r, metric, static) for _, r in compared.iterrows()]
            b = base[(base["phase"] == "compare") & (base["verdict"] == "baseline")]
            n_to, n_hit = (_count(b.iloc[0]["n_to_target"]), _count(b.iloc[0]["n_reached"])) if len(b) else (0, 0)
            if n_hit < n_to:
                out.verdicts.append(f"{static} reached the target on {n_hit}/{n_to} runs: compute relative to "
                                    "it is undefined")
    out.table = base[TABLE_COLUMNS].reset_index(drop=True)
    return out


def _fill(table: pd.DataFrame, rows: pd.Series, source: pd.DataFrame, columns: dict[str, str]) -> None:
    """Copy ``source`` (indexed by arm) into the selected rows of ``table``, matched by arm.

    Args:
        table: the comparison table, changed in place.
        rows: boolean mask of the rows to fill (the compare rows).
        source: one row per arm.
        columns: table column -> source column.
    """
    if source.empty:
        return
    arms = table.loc[rows, "arm"]
    arms = arms[arms.isin(source.index)]
    for col, src in columns.items():
        table.loc[arms.index, col] = source.loc[arms.to_numpy(), src].to_numpy()
