"""PNG plots of a sweep (matplotlib's object API on the Agg canvas: no global backend is
switched, nothing is shown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from metalearner.report.runs import number, one_point_per_step, run_summary


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
    traces_df = one_point_per_step(traces_df)
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
        settings = search.set_index("run_id")[[c for c in search if c.startswith("controller.")]].map(number)
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



def plot_pareto(table: pd.DataFrame, metric: str, mode: str, colours: dict[str, str], path: str | Path) -> Path:
    """``pareto.png``: final ``metric`` against attention compute, one colour per arm.

    Arms (means over seeds, with their 95% t interval) are large circles, filled when on
    the arms' Pareto front and hollow when dominated, the front joined by a black dashed
    step line; search trials are small dots in their arm's colour, those on the trials'
    front ringed in black and joined by a grey dotted line.

    Args:
        table: `metalearner.report.pareto.pareto_table`'s frame.
        metric, mode: the plotted metric and its direction.
        colours: arm -> ``#rrggbb`` (`metalearner.tracking.arm_colours`).
        path: the PNG to write.
    Returns:
        ``path``.
    """
    fig, ax = _figure(f"final {metric} vs attention compute (Pareto fronts outlined)",
                      "attention compute (query-key pairs per layer and sequence, summed over steps)",
                      f"final {metric} ({mode})")
    ok = table[table["dominated"].notna()]
    grey = "#9e9e9e"

    def front_line(rows: pd.DataFrame, **style: Any) -> None:
        front = rows[~rows["dominated"].astype(bool)].sort_values("attn_compute")
        if len(front) >= 2:
            ax.step(front["attn_compute"], front["value"], where="post", **style)

    trials = ok[ok["kind"] == "trial"]
    labelled: set[str] = set()
    for r in trials.itertuples(index=False):
        c = colours.get(r.arm, grey)
        ax.scatter([r.attn_compute], [r.value], s=18, color=c, alpha=0.55, zorder=2,
                   edgecolors="black" if not r.dominated else "none", linewidths=0.8,
                   label=f"{r.arm} trials" if r.arm not in labelled else None)
        labelled.add(r.arm)
    front_line(trials, color=grey, ls=":", lw=1.0, label="trials' front" if len(trials) >= 2 else None)
    arms = ok[ok["kind"] == "arm"]
    for r in arms.itertuples(index=False):
        c = colours.get(r.arm, grey)
        ax.errorbar([r.attn_compute], [r.value], yerr=[r.value_ci95] if pd.notna(r.value_ci95) else None,
                    fmt="o", ms=9, color=c, mfc="white" if r.dominated else c,
                    mec="black" if not r.dominated else c, mew=1.4, capsize=3, zorder=3,
                    label=f"{r.arm}" + (" (dominated)" if r.dominated else ""))
        ax.annotate(str(r.point), (r.attn_compute, r.value), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front_line(arms, color="black", ls="--", lw=1.0, label="arms' front" if len(arms) >= 2 else None)
    xs = ok["attn_compute"]
    if len(xs) and (xs > 0).all() and xs.max() / xs.min() > 20:
        ax.set_xscale("log")
    ax.margins(x=0.08, y=0.1)  # room for the arms' names
    if len(ok):
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, Path(path))
