"""Quality against compute: the Pareto front of a sweep's arms and search trials.

Two objectives: the spec's metric (its final value; ``val_loss`` by default, in the
spec's direction) and the attention compute a run spent (``attn_compute``: the report's
one cost model, `stats.attention_cost`, query-key pairs one layer scores per sequence at
each step's window, summed over all the run's steps; a trial reports the same figure
as it trains, `trainables.reporting.AttentionMeter`). A point dominates another when it is
at least as good on both and better on one.

Points, and who is compared with whom:
- an **arm** is the mean over its finished compare-phase runs (equal steps, the
  comparison seeds); arms are compared with arms. Dominance on means is a description,
  not a test: the table's verdicts say what survives seed noise;
- a **trial** is one finished search-phase run (the tuning seed); trials are compared with
  trials. Runs cut short (failed, stopped early by a scheduler), diverged or without the
  model's shape are left out: their compute is not comparable.

The same dominance picks the configuration a multi-objective search hands to its
confirmation (`pick`, used by `trainables.tuning.best_result`). This module computes and
writes (``pareto.csv``, the plot through `plots.plot_pareto`); `landing_artifacts` names
what the MLflow landing page should show. Never imports ray, torch or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from metalearner.report import stats
from metalearner.report.compare import run_status
from metalearner.report.plots import plot_pareto
from metalearner.report.runs import one_point_per_step
from metalearner.tracking import arm_colours

ATTN_KEY = "attn_compute"  # as `trainables.reporting.ATTN_KEY` (the report imports no trainable)
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
REPORT_ARTIFACTS = "report"  # the parent run's artifact folder the report is logged to
PARETO_COLUMNS = ["point", "kind", "arm", "n_runs", "value", "value_ci95", ATTN_KEY, "dominated", "dominated_by",
                  "run_ids"]
PICKS = ("knee", "best")


# ---------------------------------------------------------------- dominance


def _as_min(points: Sequence[Sequence[float]] | np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """``points`` (n, k) with every "max" column negated, so that lower is better everywhere."""
    x = np.asarray(points, dtype=float).reshape(len(points), len(modes))
    for j, m in enumerate(modes):
        if m not in ("min", "max"):
            raise ValueError(f"modes[{j}]: got {m!r}, expected 'min' or 'max'")
        if m == "max":
            x[:, j] = -x[:, j]
    return x


def dominators(points: Sequence[Sequence[float]] | np.ndarray, modes: Sequence[str]) -> list[list[int]]:
    """For each point, the indices of the points that dominate it.

    A point dominates another when it is at least as good on every objective and better
    on at least one (equal points do not dominate each other). A point with a non-finite
    value is left out: it dominates nothing and its list is empty.

    Args:
        points: n points of k objectives, shape (n, k).
        modes: one "min" or "max" per objective.
    Returns:
        n lists of indices, in index order.
    """
    x = _as_min(points, modes)
    ok = np.isfinite(x).all(axis=1)
    out: list[list[int]] = []
    for i in range(len(x)):
        if not ok[i]:
            out.append([])
            continue
        le = (x <= x[i]).all(axis=1) & (x < x[i]).any(axis=1) & ok
        out.append([int(j) for j in np.flatnonzero(le)])
    return out


def front_mask(points: Sequence[Sequence[float]] | np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Whether each point is on the Pareto front (finite and dominated by none)."""
    x = _as_min(points, modes)
    ok = np.isfinite(x).all(axis=1)
    return ok & np.array([not d for d in dominators(points, modes)], dtype=bool)


def pick(points: Sequence[Sequence[float]] | np.ndarray, modes: Sequence[str], how: str = "knee",
         primary: int = 0) -> int | None:
    """The point of the Pareto front a multi-objective search confirms.

    Args:
        points: n points of k objectives.
        modes: "min"/"max" per objective.
        how: "knee": the front point closest (Euclidean) to the ideal point after each
            objective is scaled to [0, 1] over the front (an objective on which the front
            does not vary counts 0); "best": the front point best on objective ``primary``.
        primary: the objective "best" ranks on (the spec's metric).
    Returns:
        The index of the chosen point (ties: the lowest index), or None when no point is finite.
    """
    if how not in PICKS:
        raise ValueError(f"how: got {how!r}, expected one of {list(PICKS)}")
    x = _as_min(points, modes)
    idx = np.flatnonzero(front_mask(points, modes))
    if not len(idx):
        return None
    front = x[idx]
    if how == "best":
        return int(idx[int(np.argmin(front[:, primary]))])
    lo, hi = front.min(axis=0), front.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    dist = np.sqrt((((front - lo) / span) ** 2).sum(axis=1))
    return int(idx[int(np.argmin(dist))])


# ---------------------------------------------------------------- a sweep's points


def run_attention(runs_df: pd.DataFrame, traces_df: pd.DataFrame) -> pd.Series:
    """The attention compute each run spent over all its steps, from its ``window`` trace.

    Args:
        runs_df, traces_df: from `load_traces` (a step stored twice counts once).
    Returns:
        run_id -> `stats.attention_cost` summed over steps 1..last (its last ``loss`` or
        ``window`` step; a step missing from the window trace takes the last logged
        window); NaN for a run without a window trace or without the model's shape params.
    """
    t = one_point_per_step(traces_df)
    win = t[t["key"] == "window"]
    last = t[t["key"].isin(["loss", "window"])].groupby("run_id")["step"].max()
    out = {}
    for r in runs_df.itertuples(index=False):
        shape = [float(getattr(r, c)) for c in ("seq_len", "n_heads", "n_global_heads")]
        w = win[win["run_id"] == r.run_id].set_index("step")["value"].sort_index()
        if w.empty or not all(math.isfinite(v) for v in shape):
            out[r.run_id] = float("nan")
            continue
        steps = np.arange(1, int(last[r.run_id]) + 1)
        per_step = w.reindex(w.index.union(steps)).ffill().bfill().reindex(steps).to_numpy()
        causal = str(getattr(r, "arch", "decoder") or "decoder") != "encoder_decoder"
        out[r.run_id] = float(np.sum(stats.attention_cost(per_step, int(shape[0]), int(shape[1]), int(shape[2]),
                                                          causal)))
    return pd.Series(out, dtype=float)


def pareto_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, metric: str = "val_loss",
                 mode: str = "min") -> pd.DataFrame:
    """The points of a sweep (arms, then search trials) with their dominance.

    Args:
        runs_df, traces_df: from `load_traces`.
        metric, mode: the spec's metric and its direction.
    Returns:
        ``PARETO_COLUMNS``: point (the arm, or the trial's run name), kind ("arm" or
        "trial"), arm, n_runs, value (the metric's final value; an arm's mean over its
        finished runs) with value_ci95 (arms, n >= 2), attn_compute (likewise), dominated
        (within its kind; NaN for a point without both figures), dominated_by (the points
        of its kind that dominate it, comma-separated), run_ids. Arms first, then trials,
        each sorted by value (best first).
    """
    if runs_df.empty:
        return pd.DataFrame(columns=PARETO_COLUMNS)
    status = run_status(runs_df, traces_df, metric)
    status = status[status["status"] == "finished"]
    attn = run_attention(runs_df[runs_df["run_id"].isin(status["run_id"])], traces_df)
    status = status.assign(attn=status["run_id"].map(attn))
    names = runs_df.set_index("run_id")["run_name"]
    rows = []
    for arm, g in status[status["phase"] == "compare"].groupby("arm", sort=True):
        rows.append({"point": arm, "kind": "arm", "arm": arm, "n_runs": len(g), "value": stats.mean(g["value"]),
                     "value_ci95": stats.ci95(g["value"]),
                     ATTN_KEY: float(g["attn"].mean()) if g["attn"].notna().all() else float("nan"),
                     "run_ids": ",".join(g["run_id"])})
    for r in status[status["phase"] != "compare"].itertuples(index=False):
        rows.append({"point": str(names.get(r.run_id) or r.run_id), "kind": "trial", "arm": r.arm, "n_runs": 1,
                     "value": r.value, "value_ci95": float("nan"), ATTN_KEY: r.attn, "run_ids": r.run_id})
    table = pd.DataFrame(rows, columns=PARETO_COLUMNS)
    parts = []
    for kind in ("arm", "trial"):
        part = table[table["kind"] == kind].copy()
        key = part["value"] if mode == "min" else -part["value"]
        part = part.assign(_k=key).sort_values(["_k", ATTN_KEY], kind="stable").drop(columns="_k")
        pts = part[["value", ATTN_KEY]].to_numpy(dtype=float)
        doms = dominators(pts, [mode, "min"])
        finite = np.isfinite(pts).all(axis=1)
        labels = list(part["point"])
        part["dominated"] = [bool(d) if ok else np.nan for d, ok in zip(doms, finite)]
        part["dominated_by"] = [",".join(labels[j] for j in d) for d in doms]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[PARETO_COLUMNS]


def pareto_sentence(table: pd.DataFrame, metric: str = "val_loss", mode: str = "min") -> str:
    """One line: which arms are dominated (and by which), which are on the front, and how
    many search trials are on theirs; "" when there are fewer than two arms or trials."""
    parts = []
    arms = table[(table["kind"] == "arm") & table["dominated"].notna()]
    if len(arms) >= 2:
        dominated = arms[arms["dominated"].astype(bool)]
        front = ", ".join(arms.loc[~arms["dominated"].astype(bool), "point"])
        if len(dominated):
            which = "; ".join(f"{r.point} (by {r.dominated_by.replace(',', ', ')})" for r in dominated.itertuples())
            parts.append(f"dominated arm(s): {which}; on the front: {front}")
        else:
            parts.append(f"no arm is dominated: each of {front} trades {metric} against attention compute")
    trials = table[(table["kind"] == "trial") & table["dominated"].notna()]
    if len(trials) >= 2:
        parts.append(f"{int((~trials['dominated'].astype(bool)).sum())} of {len(trials)} search trials on their front")
    if not parts:
        return ""
    return (f"Pareto front (final {metric}, {mode}; attention compute, min; arm means over seeds, a description, "
            f"not a test): " + "; ".join(parts) + ".")


# ---------------------------------------------------------------- the report's part


@dataclass
class ParetoReport:
    """What `write_pareto` produced.

    Args:
        table: `pareto_table`'s frame.
        sentence: `pareto_sentence` ("" when there is nothing to say).
        text: the terminal section (the arms and the trials on the front, and the sentence).
        markdown: the same section as markdown, for ``comparison.md``.
        files: ``pareto.csv`` and ``pareto.png`` when written.
    """

    table: pd.DataFrame
    sentence: str = ""
    text: str = ""
    markdown: str = ""
    files: list[Path] = field(default_factory=list)


def _shown(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows the terminal and markdown show (every arm, the trials on the front), formatted."""
    rows = table[(table["kind"] == "arm") | table["dominated"].eq(False)]  # NaN (no figures) is neither
    out = pd.DataFrame({
        "point": [p if k == "arm" else f"{p} [trial]" for p, k in zip(rows["point"], rows["kind"])],
        f"final {metric}": [("n/a" if not np.isfinite(v) else f"{v:.4f}" + (f" ± {c:.4f}" if np.isfinite(c) else ""))
                            for v, c in zip(rows["value"], rows["value_ci95"])],
        "attn compute": [f"{a:.4g}" if np.isfinite(a) else "n/a" for a in rows[ATTN_KEY]],
        "front": ["n/a" if pd.isna(d) else ("dominated" if d else "yes") for d in rows["dominated"]],
        "dominated by": [s.replace(",", ", ") for s in rows["dominated_by"]],
    })
    return out


def write_pareto(runs_df: pd.DataFrame, traces_df: pd.DataFrame, metric: str, mode: str, out_dir: str | Path,
                 arm_order: Iterable[str] = ()) -> ParetoReport:
    """The Pareto part of a sweep's report: ``pareto.csv`` (every point; the value column
    named after the metric), ``pareto.png`` (`plots.plot_pareto`, arms in their
    `arm_colours`), the sentence and the text/markdown sections. Nothing is written when
    fewer than two points have both figures.

    Args:
        runs_df, traces_df: from `load_traces`.
        metric, mode: the spec's metric and its direction.
        out_dir: the report folder.
        arm_order: the spec's arm order (the parent's ``metalearner.arms`` tag), for the colours.
    Returns:
        A `ParetoReport`.
    """
    table = pareto_table(runs_df, traces_df, metric, mode)
    if int(table["dominated"].notna().sum()) < 2:
        return ParetoReport(table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / PARETO_CSV
    table.rename(columns={"value": metric, "value_ci95": f"{metric}_ci95"}).to_csv(csv, index=False)
    colours = arm_colours([a for a in arm_order if a] + sorted(set(table["arm"])))
    png = plot_pareto(table, metric, mode, colours, out / PARETO_PNG)
    sentence = pareto_sentence(table, metric, mode)
    shown = _shown(table, metric)
    n_hidden = len(table) - len(shown)
    more = f"\n({n_hidden} dominated or incomparable trial(s) more in {PARETO_CSV})" if n_hidden else ""
    text = "Pareto front\n" + shown.to_string(index=False) + more + ("\n" + sentence if sentence else "")
    head = "| " + " | ".join(shown.columns) + " |\n| " + " | ".join("---" for _ in shown.columns) + " |"
    body = "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in shown.itertuples(index=False))
    markdown = f"## Pareto front\n\n![Pareto front]({PARETO_PNG})\n\n{head}\n{body}\n{more.strip()}\n\n{sentence}\n"
    return ParetoReport(table, sentence, text, markdown, [csv, png])


def landing_artifacts(files: Iterable[str | Path]) -> list[str]:
    """The artifact paths (in the parent run, under ``report/``) the MLflow landing page
    should show with no click: the Pareto plot, when the report wrote one.

    Args:
        files: the files the report wrote (`SweepReport.files`).
    Returns:
        ``["report/pareto.png"]`` or ``[]``.
    """
    return [f"{REPORT_ARTIFACTS}/{PARETO_PNG}" for f in files if Path(f).name == PARETO_PNG]
