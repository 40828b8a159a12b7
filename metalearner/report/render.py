"""The comparison table as text: a fixed-width terminal table, GitHub markdown, and the
trace audit (duplicate points). Strings only; the numbers come from `compare_table`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

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
