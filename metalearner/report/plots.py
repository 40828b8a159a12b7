"""PNG plots of a sweep (matplotlib's object API on the Agg canvas: no global backend is
switched, nothing is shown). An arm has the colour it has in the MLflow UI and the
terminal (`metalearner.report.runs.arm_palette`), and legends name arms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from metalearner.report.runs import SETTING_PREFIX, arm_palette, number, one_point_per_step, run_summary


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _shade(colour: str, i: int, n: int) -> tuple[float, float, float]:
    """Member ``i`` of ``n``'s shade of its arm's ``colour``: darker to lighter, the arm's own
    colour in the middle (members of a population share their arm's colour)."""
    from matplotlib.colors import to_rgb

    rgb = to_rgb(colour)
    f = 0.0 if n < 2 else -0.35 + 0.8 * i / (n - 1)
    return tuple(c * (1 + f) if f < 0 else c + (1 - c) * f for c in rgb)  # type: ignore[return-value]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_traces(runs_df: pd.DataFrame, traces_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """PNG plots of a sweep: ``rope_base.png``, ``window.png``, ``loss.png``, when the
    sweep searched ``search.png``, and when a population-based scheduler changed settings
    ``lineage.png`` (`plot_lineage`).

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
    colour = arm_palette(runs_df)
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
            cut_label = "stopped early (final val loss at an earlier step)"
            for arm, g in search.groupby("arm"):
                ids = [r for r in g["run_id"] if r in final.index]
                done = [r for r in ids if summary.loc[r, "complete"]]
                cut = [r for r in ids if not summary.loc[r, "complete"]]
                ax.scatter(settings.loc[done, xkey], final[done], color=colour[arm], s=22, label=arm)
                if cut:
                    ax.scatter(settings.loc[cut, xkey], final[cut], facecolors="none", edgecolors=colour[arm],
                               s=22, label=cut_label)
                    cut_label = None
            xs = settings[xkey].dropna()
            if len(xs) and (xs > 0).all() and xs.max() / xs.min() > 20:
                ax.set_xscale("log")
            ax.legend(title="arm", fontsize=8)
            written.append(_save(fig, out / "search.png"))
    return written + plot_lineage(runs_df, traces_df, out)



MAX_POPULATIONS = 6  # columns of lineage.png (the first populations by arm and seed)
DASHES = ("-", "--", "-.", ":")


def plot_lineage(runs_df: pd.DataFrame, traces_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``lineage.png``: what a population-based scheduler (PBT/PB2) did to each member.

    One column per population (an arm's members on one seed), one row per setting the
    scheduler changes (the ``controller.*`` metrics: the settings in force, drawn as the
    step functions they are) and one for the ``window`` the settings moved. Each member is
    a line in its arm's colour (a shade and a dash of its own; the legend names its trial,
    "(compared)" for the member promoted to the comparison). Each perturbation, read back
    from the member's tags (`metalearner.report.runs.perturbation_events`), is a dotted
    vertical line before the first step with the new settings, a dot on each new value,
    and, in a strip above the rows, the member and the trial whose weights it copied.

    Returns:
        ``[lineage.png]``, or [] when no run logged settings in force.
    """
    t = one_point_per_step(traces_df)
    settings = sorted(k for k in t["key"].unique() if str(k).startswith(SETTING_PREFIX))
    if runs_df.empty or not settings:
        return []
    members = runs_df[runs_df["run_id"].isin(t.loc[t["key"].isin(settings), "run_id"])]
    pops = list(members.groupby(["arm", "seed"], sort=True, dropna=False))[:MAX_POPULATIONS]
    keys = [*settings, "window"]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(7.0, 4.8 * len(pops) + 0.6), 2.0 * len(keys) + 2.0), dpi=110)
    grid = fig.subplots(len(keys) + 1, len(pops), sharex="col", squeeze=False,
                        gridspec_kw={"height_ratios": [0.55] + [1.0] * len(keys)})
    palette = arm_palette(runs_df)
    for col, ((arm, seed), group) in enumerate(pops):
        group = group.sort_values("trial_id" if "trial_id" in group else "run_name")
        notes, axes = grid[0][col], [row[col] for row in grid[1:]]  # a strip for the perturbations, then the rows
        events = 0
        right = float(t.loc[t["run_id"].isin(group["run_id"]), "step"].max())  # notes end left of it
        for i, r in enumerate(group.to_dict("records")):
            shade, dash = _shade(palette[arm], i, len(group)), DASHES[i % len(DASHES)]
            name = r.get("trial_id") or r["run_name"]
            label = f"trial {name}" + (" (compared)" if r["phase"] == "compare" else "")
            mine = t[t["run_id"] == r["run_id"]].sort_values("step")
            for row, key in enumerate(keys):
                line = mine[mine["key"] == key]
                if len(line):
                    axes[row].step(line["step"], line["value"], where="post", color=shade, ls=dash, lw=1.2,
                                   label=label if row == 0 else None)
            for p in r.get("perturbations") or ():
                for ax in (notes, *axes):
                    ax.axvline(p.step - 0.5, color=shade, ls=":", lw=0.9)
                for row, key in enumerate(keys):
                    new = {k: v for k, _, v in p.settings}.get(key)
                    if new is not None:
                        axes[row].plot([p.step], [new], "o", color=shade, ms=4)
                late = p.step > 0.6 * right
                notes.text(p.step - 0.5 + (-0.3 if late else 0.3), 0.82 - 0.24 * (events % 4),
                           f"step {p.step}: {name} ← trial {p.donor_trial}", ha="right" if late else "left",
                           va="center", fontsize=7, color=shade)
                events += 1
        notes.set_title(f"{arm}, seed {seed}: {len(group)} members, {events} perturbation(s)", fontsize=9)
        notes.set_ylim(0, 1)
        notes.set_yticks([])
        notes.spines[["left", "right", "top"]].set_visible(False)
        axes[0].legend(fontsize=7, loc="best")
        for row, key in enumerate(keys):
            ax = axes[row]
            ax.grid(True, alpha=0.3)
            ax.set_ylabel(key.removeprefix(SETTING_PREFIX), fontsize=8)
            ys = t[(t["key"] == key) & t["run_id"].isin(group["run_id"])]["value"]
            if len(ys) and (ys > 0).all() and ys.max() / ys.min() > 20:
                ax.set_yscale("log")
        axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Population lineage: each member's settings in force per step, and its window\n"
                 "dotted line + dot: a perturbation (new settings; weights of the trial after ←)", fontsize=9)
    return [_save(fig, Path(out_dir) / "lineage.png")]


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
