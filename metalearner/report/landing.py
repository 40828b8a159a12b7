"""What the MLflow experiment page shows with no click: the answer and its picture.

MLflow 3.17 shows an experiment's description (the experiment tag ``mlflow.note.content``,
markdown) above its runs, collapsed to its first line (32 px; one click expands it). So
the first line is the overall answer, with the minimum detectable effect
(`answer_line`: "no arm differs from static at n=2; differences in val_loss under 0.74
cannot be detected"); the per-arm verdict lines, the difference chart (`plot_delta`, a
PNG of the parent run, drawn from its artifact by the page), the best controllers and
the links to the view and the report's files follow. `running_description` is what the
page says while a sweep runs.

Strings and a matplotlib figure only: `metalearner.report.publish` and
`metalearner.report.live` store them through `metalearner.tracking`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from metalearner.report.compare import Comparison, run_status

NOTE_END = "<!-- metalearner: end of the comparison summary -->"
DELTA_PNG = "delta_vs_static.png"  # the report's difference chart (under report/ on the parent run)
_MDE = re.compile(r"with n=(\d+) seeds?, differences in (\S+) under (\S+) cannot be detected")
_NO_MDE = re.compile(r"with n=(\d+) seeds?, no difference in (\S+) can be detected")


def _mde_clause(sentence: str, metric: str) -> tuple[str, str]:
    """(n, "differences in M under X cannot be detected") from the MDE sentence."""
    m = _MDE.search(sentence)
    if m:
        return m.group(1), f"differences in {m.group(2)} under {m.group(3)} cannot be detected"
    m = _NO_MDE.search(sentence)
    if m:
        return m.group(1), f"no difference in {metric} can be detected (no variance estimate)"
    return "", ""


def answer_line(comp: Comparison) -> str:
    """The overall answer of a sweep, in one line.

    Args:
        comp: `compare_sweep`'s result.

    Returns:
        e.g. "no arm differs from static at n=2; differences in val_loss under 0.74 cannot
        be detected", "better than static: ewma-tuned; worse: schedule; 1 other arm does not
        differ at n=5; differences in val_loss under 0.03 cannot be detected", "no comparison:
        search trials only; the best reached val_loss 1.52 (ewma)", or "no static arm:
        nothing tested; ...".
    """
    t, metric = comp.table, comp.metric
    cmp = t[t["phase"] == "compare"]
    if cmp.empty:
        search = t[(t["phase"] == "search") & t["final_val_loss_mean"].notna()]
        if search.empty:
            return "no comparison and no finished trial: nothing to report yet"
        best = search.sort_values("final_val_loss_mean").iloc[0]
        return (f"no comparison: search trials only; the best reached val_loss "
                f"{best['final_val_loss_mean']:.4g} ({best['arm']})")
    base = cmp[cmp["verdict"] == "baseline"]
    if base.empty:
        ok = cmp[cmp["value_mean"].notna()]
        if ok.empty:
            return "no static arm and no finished run: nothing tested"
        best = ok.sort_values("value_mean", ascending=comp.lower_is_better).iloc[0]
        return (f"no static arm: nothing tested; best mean {metric}: {best['arm']} "
                f"{best['value_mean']:.4g} (n={int(best['n_finished'])})")
    static = str(base.iloc[0]["arm"])
    tested = cmp[cmp["verdict"] != "baseline"]
    verdicts = tested["verdict"].astype(str)
    if len(tested) and verdicts.str.startswith("no verdict: baseline").all():
        return f"no verdict: {static} has no finished run"
    better = list(tested.loc[verdicts == "better", "arm"])
    worse = list(tested.loc[verdicts == "worse", "arm"])
    none = list(tested.loc[verdicts.str.startswith("no verdict"), "arm"])
    same = len(tested) - len(better) - len(worse) - len(none)
    n, mde = _mde_clause(comp.mde_sentence, metric)
    at = f" at n={n}" if n else ""
    if not better and not worse:
        head = (f"no arm differs from {static}{at}" if same else f"no arm could be tested against {static}")
    else:
        parts = ([f"better than {static}: {', '.join(better)}"] if better else []) + \
                ([f"worse than {static}: {', '.join(worse)}"] if worse else [])
        head = "; ".join(parts)
        if same:
            head += f"; {same} other arm{'s do' if same > 1 else ' does'} not differ{at}"
        elif at:
            head += f" ({at.strip()})"
    if none:
        head += f"; no verdict for {', '.join(none)}"
    return head + (f"; {mde}" if mde and same else "")


def per_run_deltas(runs_df: pd.DataFrame, traces_df: pd.DataFrame, metric: str, static: str) -> dict[str, float]:
    """Each finished compare trial's final ``metric`` minus static's on the same seed.

    Args:
        runs_df, traces_df: from `load_traces`.
        metric: the compared metric.
        static: the baseline arm.

    Returns:
        run id -> difference, for the non-static trials whose seed static finished.
    """
    st = run_status(runs_df, traces_df, metric)
    ok = st[(st["phase"] == "compare") & (st["status"] == "finished")]
    base = ok[ok["arm"] == static].drop_duplicates("seed").set_index("seed")["value"]
    arms = ok[(ok["arm"] != static) & ok["seed"].isin(base.index)]
    return {r.run_id: float(r.value - base[r.seed]) for r in arms.itertuples(index=False)}


def plot_delta(comp: Comparison, colours: dict[str, str], path: str | Path) -> Path | None:
    """The difference chart: each arm's mean paired difference from static with its 95% t
    interval, on an axis centred on 0 (= static), with the band of differences the sweep
    could not detect (± the minimum detectable effect) shaded.

    Args:
        comp: `compare_sweep`'s result.
        colours: arm -> colour (the UI's, `metalearner.tracking.arm_colours`).
        path: the PNG to write.

    Returns:
        The path, or None when no arm was compared with static.
    """
    from matplotlib.figure import Figure

    t = comp.table
    rows = t[(t["phase"] == "compare") & (t["verdict"] != "baseline") & t["vs_static_delta"].notna()]
    base = t[(t["phase"] == "compare") & (t["verdict"] == "baseline")]
    if rows.empty or base.empty:
        return None
    static = str(base.iloc[0]["arm"])
    rows = rows.iloc[::-1]  # the table's best arm on top
    fig = Figure(figsize=(7.5, 0.8 + 0.55 * len(rows)), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    mde = rows["mde"].astype(float)
    band = float(np.nanmin(mde)) if np.isfinite(mde).any() else math.nan
    if np.isfinite(band) and band > 0:
        ax.axvspan(-band, band, color="#e0e0e0", zorder=0)
    ax.axvline(0.0, color="#444444", lw=1.0, zorder=1)
    for i, (_, r) in enumerate(rows.iterrows()):
        d, ci = float(r["vs_static_delta"]), float(r["vs_static_ci95"])
        c = colours.get(str(r["arm"]), "#1f77b4")
        ax.errorbar([d], [i], xerr=[[ci], [ci]] if np.isfinite(ci) else None, fmt="o", color=c, ms=7,
                    capsize=4, lw=2, zorder=3)
        ax.annotate(f"{r['verdict']}" + ("" if np.isfinite(ci) else " (n=1: no interval)"), (d, i),
                    xytext=(8, 7), textcoords="offset points", fontsize=8, color="#333333")
    ax.set_yticks(range(len(rows)), [str(a) for a in rows["arm"]])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, -abs(hi)), max(hi, abs(lo)))  # 0 in the middle
    better = "lower" if comp.lower_is_better else "higher"
    ax.set_xlabel(f"Δ {comp.metric} vs {static} (mean over seeds, 95% t interval; {better} is better)")
    ax.set_title(f"Each arm minus {static}" + (f"; grey: differences under {band:.3g} cannot be detected"
                                               if np.isfinite(band) and band > 0 else ""), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def artifact_image(run_id: str, path: str) -> str:
    """A markdown image of a run's artifact, as the MLflow page loads it (relative link)."""
    return f"![{Path(path).name}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})"


def best_lines(best: dict[str, dict[str, Any]]) -> list[str]:
    """One line per searched arm: its best controller's settings."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return [f"best `{arm}`: " + ", ".join(f"{k}={fmt(v)}" for k, v in ctrl.items() if k != "name")
            for arm, ctrl in best.items()]


def final_description(comp: Comparison, sweep: str, parent_run_id: str, experiment_id: str, view_link: str,
                      best: dict[str, dict[str, Any]], delta_png: str | None, kept: str = "") -> str:
    """The experiment's description once the report is written.

    Args:
        comp: `compare_sweep`'s result.
        sweep: the parent run's name.
        parent_run_id, experiment_id: where the sweep is.
        view_link: the saved view's link (a ``#/...`` fragment works on any host).
        best: searched arm -> its best controller (the parent's ``best.<arm>.*`` params).
        delta_png: the difference chart's artifact path on the parent run, or None.
        kept: what followed `NOTE_END` before (a user's own description), kept after it.

    Returns:
        Markdown: the answer (bold, the line the page shows collapsed), then the sweep and
        its links, the verdict lines, the MDE sentence, the chart, the best controllers.
    """
    run = f"#/experiments/{experiment_id}/runs/{parent_run_id}"
    lines = [f"**{answer_line(comp)}**",
             f"sweep `{sweep}`: [its trials by arm]({view_link}) · [report files]({run}/artifacts/report) · "
             f"[parent run]({run})", ""]
    lines += [f"- {v}" for v in comp.verdicts]
    if comp.mde_sentence:
        lines += ["", comp.mde_sentence]
    if delta_png:
        lines += ["", artifact_image(parent_run_id, delta_png)]
    if best:
        lines += [""] + [f"- {b}" for b in best_lines(best)]
    return "\n".join(["  \n".join(lines[:2]), *lines[2:], "", NOTE_END]) + (f"\n\n{kept}" if kept else "")


def running_description(sweep: str, doing: str, parent_run_id: str, experiment_id: str, view_link: str,
                        about: str = "", kept: str = "") -> str:
    """The experiment's description while a sweep runs (and after it, until the report).

    Args:
        sweep: the parent run's name.
        doing: what runs now, e.g. "searching ewma-tuned (2 trials)".
        parent_run_id, experiment_id: where the sweep is.
        view_link: the saved view's link.
        about: the spec's description.
        kept: a user's own description (after `NOTE_END`), kept.
    """
    run = f"#/experiments/{experiment_id}/runs/{parent_run_id}"
    head = f"**{sweep}: {doing}**  \n[its trials by arm]({view_link}) · [parent run]({run})"
    return head + (f"\n\n{about}" if about else "") + f"\n\n{NOTE_END}" + (f"\n\n{kept}" if kept else "")


def kept_text(old: str) -> str:
    """What a description holds after `NOTE_END` (or all of it, when it has none)."""
    return old.split(NOTE_END, 1)[1].lstrip() if NOTE_END in old else old
