"""The comparison table as text: a fixed-width terminal table, GitHub markdown, and the
trace audit (duplicate points). Strings only; the numbers come from `compare_table`.

The table has ~50 columns (all of them go to ``comparison.csv``); the terminal and the
markdown show the at most 11 of `display_columns` a reviewer reads first: arm, n, the
metric's mean ± 95% CI, IQM, Δ vs static, Holm p, verdict, compute to target, controller."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

HOW_TO_READ = (
    "How to read this table: each compare row is one arm run once per seed at equal steps; n counts its "
    "finished runs, with runs cut short (failed, stopped before the last step, or without a final value) and "
    "diverged runs counted beside it (never dropped). `a ± b` is the mean over seeds of the spec's metric (its "
    "last value) with the half-width of its 95% t interval; IQM (mean of the middle 50%) shows from 5 seeds. "
    "`Δ vs static` is the mean paired difference against the static arm over the seeds both finished, with its "
    "95% t half-width; `p Holm` is the paired t test's p-value after Holm's correction over the arms compared "
    "with static. The verdict is \"better\"/\"worse\" only when the Holm-corrected test rejects (family-wise "
    "α = 0.05); otherwise \"no clear difference\" — no winner is declared within noise, and the sentence under "
    "the table says which differences the run could not have detected. A diverged seed counts as a loss: an arm "
    "that lost one is never called better; an arm none of whose runs finished has no verdict and says why. "
    "`to target` columns: the target is the spec's target_loss or static's final val loss (its worst seed); "
    "`reached` is k/n finished-or-diverged runs whose val loss got there, `attn→target` the attention compute "
    "(query-key pairs of the local-window band, summed over steps) to get there relative to static's, "
    "`time→target` the same for training seconds, each with its 95% bootstrap interval (stratified by arm). "
    "Search rows are single tuning trials (n = 1, the best of their search, on the tuning seed): they are not "
    "tested, so they carry no verdict; use them to read the search, not as evidence. comparison.csv holds every "
    "column (bootstrap intervals, counts, p before Holm, the MDE, absolute compute to target)."
)


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    return format(x, spec)


def _pm(mean: float, ci: float, spec: str = ".4f") -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:{spec}} ± {ci:.4f}" if np.isfinite(ci) else f"{mean:{spec}}"


def _rel(rel: float, lo: float, hi: float, reached: float = np.nan) -> str:
    if not np.isfinite(rel):
        if rel != np.inf:
            return ""
        return "never" if reached == 0 else "∞ (not all reached)"
    return f"{rel:.2f}×" + (f" [{lo:.2f}, {_fmt(hi, '.2f') or '∞'}]" if np.isfinite(lo) else "")


def _count(r: pd.Series) -> str:
    n = r["n_finished"] if np.isfinite(r.get("n_finished", np.nan)) else r["n_seeds"]
    extra = [f"{int(r[c])} {w}" for c, w in (("n_incomplete", "cut"), ("n_diverged", "diverged"))
             if np.isfinite(r.get(c, np.nan)) and r[c]]
    return f"{int(n)}" + (f" (+{', '.join(extra)})" if extra else "")


def _reached(r: pd.Series) -> str:
    hit, of = r.get("n_reached", np.nan), r.get("n_to_target", np.nan)
    return f"{int(hit)}/{int(of)}" if np.isfinite(hit) and np.isfinite(of) else ""


def display_columns(metric: str = "val_loss") -> list[str]:
    """The columns the terminal and markdown tables show (``comparison.csv`` has them all).

    Args:
        metric: the compared metric, named in the value column.

    Returns:
        At most 11 column names; "IQM" is dropped from a table whose arms all have n < 5.
    """
    return ["arm", "n", f"final {metric}", "IQM", "Δ vs static", "p Holm", "verdict", "reached", "attn→target",
            "time→target", "controller"]


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """The table's reviewer columns, formatted for reading (strings only)."""
    rows = []
    metric = str(df["metric"].iloc[0]) if "metric" in df and len(df) and isinstance(df["metric"].iloc[0], str) \
        else "val_loss"
    for _, r in df.iterrows():
        cmp = r["phase"] == "compare"
        value, ci = (r["value_mean"], r["value_ci95"]) if cmp and np.isfinite(r.get("value_mean", np.nan)) \
            else (r["final_val_loss_mean"], r["final_val_loss_ci95"])
        delta = r.get("vs_static_delta", np.nan)
        rows.append({
            "arm": r["arm"] if cmp else f"{r['arm']} [{r['phase']}]",
            "n": _count(r) if cmp else f"{r['n_seeds']}",
            f"final {metric}": _pm(value, ci),
            "IQM": _fmt(r.get("value_iqm", np.nan)) if cmp else "",
            "Δ vs static": _pm(delta, r["vs_static_ci95"], "+.4f") if cmp and np.isfinite(delta) else "",
            "p Holm": _fmt(r.get("vs_static_p_holm", np.nan), ".3g"),
            "verdict": r["verdict"] if cmp else "not tested (search)",
            "reached": _reached(r) if cmp else "",
            "attn→target": _rel(r.get("attention_rel", np.nan), r.get("attention_rel_low", np.nan),
                                r.get("attention_rel_high", np.nan), r.get("n_reached", np.nan)) if cmp else "",
            "time→target": _rel(r.get("seconds_rel", np.nan), r.get("seconds_rel_low", np.nan),
                                r.get("seconds_rel_high", np.nan), r.get("n_reached", np.nan)) if cmp else "",
            "controller": r["controller"],
        })
    disp = pd.DataFrame(rows, columns=display_columns(metric))
    if not (disp["IQM"] != "").any():
        disp = disp.drop(columns="IQM")  # n < 5 everywhere: the IQM is not worth a column
    return disp


def render_table(df: pd.DataFrame) -> str:
    """A fixed-width text table for the terminal (``1.2345 ± 0.0123`` etc.)."""
    if df.empty:
        return "(no finished trials)"
    disp = _display(df)
    text_cols = ("arm", "controller", "verdict")
    for c in disp:  # pad to one width per column: text left-aligned, numbers right-aligned
        width = max(len(c), *(len(v) for v in disp[c]))
        disp[c] = [v.ljust(width) if c in text_cols else v.rjust(width) for v in disp[c]]
    return "\n".join(line.rstrip() for line in disp.to_string(index=False, justify="left").splitlines())


def paint_arms(text: str, colours: dict[str, str]) -> str:
    """``text`` with the arm name that starts a line (a table row, a verdict line) in its
    arm's colour (``#rrggbb``, the sweep's palette), as ANSI 24-bit colour codes: for a
    terminal only (the face decides; files and pipes get the plain text)."""
    if not colours:
        return text
    names = "|".join(re.escape(a) for a in sorted(colours, key=len, reverse=True))
    head = re.compile(rf"^(\s*)({names})(?=\s|$)", re.MULTILINE)

    def paint(m: re.Match[str]) -> str:
        h = colours[m.group(2)].lstrip("#")
        r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
        return f"{m.group(1)}\x1b[38;2;{r};{g};{b}m{m.group(2)}\x1b[0m"

    return head.sub(paint, text)


def render_markdown(df: pd.DataFrame) -> str:
    """The same table as GitHub markdown (no tabulate needed)."""
    disp = _display(df)
    head = "| " + " | ".join(disp.columns) + " |"
    rule = "| " + " | ".join("---" for _ in disp.columns) + " |"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in disp.itertuples(index=False)]
    return "\n".join([head, rule, *body])



def render_duplicates(dups: pd.DataFrame, runs_df: pd.DataFrame) -> str:
    """The trace audit: one line when every run has one point per step per key, else a
    count and one line per run and key that holds a step more than once."""
    if dups.empty:
        return "trace audit: one point per step per key in every run"
    names = runs_df.set_index("run_id")["run_name"] if len(runs_df) else pd.Series(dtype=object)
    lines = [f"trace audit: {int(dups['extra_points'].sum())} duplicate point(s) in "
             f"{dups['run_id'].nunique()} run(s) — the contract is one point per step per key; "
             "the table counts each step once (its last point)"]
    for r in dups.itertuples(index=False):
        lines.append(f"  {names.get(r.run_id, '?')} ({r.run_id}) {r.key}: {r.steps} step(s) stored more than "
                     f"once, {r.extra_points} extra point(s), first at step {r.first_step}")
    return "\n".join(lines)
