"""Read a sweep back from MLflow and say, honestly, which controller did better.

``metalearner compare NAME-or-run-id`` lands here. Pipeline::

    TrackingReader.find_sweep -> runs.load_traces -> (runs_df, traces_df)
        -> runs.duplicate_points         the trace audit (one point per step per key?)
        -> compare.compare_sweep         -> render.render_table / render_markdown
        -> plots.plot_traces
        -> export.export_best_controller
        -> landing.plot_delta            each arm's difference from static, with its interval
        -> view.view_state / saved_view  the MLflow UI view the printed link opens
        -> landing.final_description     the answer on the experiment page (no click)
    write_report = all of it, written to a folder and logged back to the parent run (with
    summary metrics per arm, the verdicts in its description, each compare trial's
    difference from static, the saved view and the experiment's description).

One job per module: `runs` shapes what `metalearner.tracking` (the only module that talks
to MLflow) returns into frames, `stats` holds the statistics (a package, one module per
job: intervals, pairing, verdicts, power, to_target), `compare` builds the table,
`render` turns it into text (all columns go to comparison.csv, a reviewer's dozen to the
terminal and markdown), `plots` draws, `export` writes the best controller spec,
`landing` says the answer where the MLflow page shows it, `view` builds the saved view
and `live` keeps link, view and description right while a sweep runs.
Never imports ray or torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from metalearner.report.compare import TABLE_COLUMNS, Comparison, compare_sweep, compare_table
from metalearner.report.export import export_best_controller
from metalearner.report.landing import (
    DELTA_PNG,
    NOTE_END,
    answer_line,
    final_description,
    kept_text,
    per_run_deltas,
    plot_delta,
)
from metalearner.report.pareto import write_pareto
from metalearner.report.plots import plot_traces
from metalearner.report.render import HOW_TO_READ, display_columns, render_duplicates, render_markdown, render_table
from metalearner.report.runs import (
    DUPLICATE_COLUMNS,
    REPORT_KEYS,
    arm_palette,
    controller_summary,
    duplicate_points,
    load_traces,
    number,
    run_summary,
)
from metalearner.report.view import delta_key, saved_view, view_key, view_state
from metalearner.trace import TRACE_KEYS
from metalearner.tracking import (
    NOTE_TAG,
    RUN_COLOR_TAG,
    MlflowWriter,
    TrackingIncomplete,
    TrackingReader,
    experiment_url,
    run_colour,
    ui_features,
)
from metalearner.tracking.ui import sweep_arm_colours


@dataclass
class SweepReport:
    """What `write_report` produced.

    Args:
        parent_run_id: the sweep's parent run.
        table: `compare_table`'s frame.
        text: the report for the terminal (header, table, trace audit, how to read it).
        files: the files written (and logged, unless told not to).
        experiment: the sweep's MLflow experiment.
        duplicates: `duplicate_points` of the sweep's traces (empty when there are none).
        comparison: `compare_sweep`'s result (MDE sentence, target, verdict lines).
        url: the link to print: the saved view (chart mode, grouped by arm) when it was
            written, else the experiment's runs page; both carry workflowType=machine_learning.
        view_key: the saved view's id, "" when none was written.
        colours: arm -> ``#rrggbb``, the sweep's one palette (UI, plots, terminal table).
    """

    parent_run_id: str
    table: pd.DataFrame
    text: str
    files: list[Path] = field(default_factory=list)
    experiment: str = ""
    duplicates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DUPLICATE_COLUMNS))
    comparison: Comparison | None = None
    url: str = ""
    view_key: str = ""
    colours: dict[str, str] = field(default_factory=dict)


def write_report(tracking_uri: str, name_or_run_id: str, out_dir: str | Path,
                 log_to_mlflow: bool = True) -> SweepReport:
    """Find a sweep, build its comparison and plots, write them to ``out_dir`` and (by
    default) log them as artifacts of the sweep's parent run under ``report/``.

    Files: ``comparison.csv`` (the full table), ``comparison.md`` (markdown table, trace
    audit and how to read it), ``duplicates.csv`` (only when a trace holds a step more
    than once), ``best_controller.yaml`` (when an arm has a final val loss) and the plots.

    Raises:
        ValueError: one line, when no sweep matches ``name_or_run_id``.
        TrackingIncomplete: the report's writes did not all reach the store (they are
            journaled: ``metalearner sync`` delivers them).
    """
    reader = TrackingReader(tracking_uri)
    parent = reader.find_sweep(name_or_run_id)
    pid = parent.info.run_id
    experiment = reader.experiment_name(parent)
    exp_id = reader.experiment_id(parent)
    params = parent.data.params
    metric = str(params.get("metric") or "val_loss")
    mode = str(params.get("mode") or "min")
    target_loss = number(params.get("target_loss"))
    runs_df, traces_df = load_traces(tracking_uri, pid, keys=tuple(dict.fromkeys((*TRACE_KEYS, *REPORT_KEYS, metric))))
    comp = compare_sweep(runs_df, traces_df, metric=metric, mode=mode,
                         target_loss=target_loss if math.isfinite(target_loss) else None)
    table = comp.table
    dups = duplicate_points(traces_df)
    audit = render_duplicates(dups, runs_df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_cmp = int((runs_df["phase"] == "compare").sum()) if len(runs_df) else 0
    header = (f"sweep {experiment!r} (parent run {pid}): {len(runs_df)} trials, "
              f"{n_cmp} in the equal-steps comparison; metric {metric} ({mode})")
    summary = render_summary(comp)
    text = "\n".join([header, "", render_table(table), "", summary, "", audit, "", HOW_TO_READ])

    files = []
    csv = out / "comparison.csv"
    table.to_csv(csv, index=False)
    md = out / "comparison.md"
    md.write_text(f"# Sweep `{experiment}`\n\nParent run `{pid}` in `{tracking_uri}`: {len(runs_df)} trials, "
                  f"{n_cmp} in the equal-steps comparison; metric `{metric}` ({mode}).\n\n{render_markdown(table)}\n\n"
                  f"{summary}\n\n```\n{audit}\n```\n\n{HOW_TO_READ}\n")
    files += [csv, md]
    front = write_pareto(runs_df, traces_df, metric, mode, out, str(parent.data.tags.get("metalearner.arms", "")).split(","))
    if front.files:  # quality against compute: pareto.csv/png, a section, and the sentence in the run's note
        files += front.files
        md.write_text(md.read_text() + "\n" + front.markdown)
        text += "\n\n" + front.text
        comp.verdicts += [front.sentence] if front.sentence else []
    if len(comp.per_run_to_target):
        to_target = out / "to_target.csv"
        comp.per_run_to_target.to_csv(to_target, index=False)
        files.append(to_target)
    if len(dups):
        dup_csv = out / "duplicates.csv"
        dups.to_csv(dup_csv, index=False)
        files.append(dup_csv)
    if (table["phase"] == "compare").any() and table["final_val_loss_mean"].notna().any():
        best = out / "best_controller.yaml"
        export_best_controller(runs_df, traces_df, best)
        files.append(best)
    files += plot_traces(runs_df, traces_df, out)
    delta_png = plot_delta(comp, arm_palette(runs_df), out / DELTA_PNG)
    if delta_png is not None:
        files.append(delta_png)
    url, key = experiment_url(tracking_uri, exp_id), ""
    if log_to_mlflow:  # journaled and delivered like every write, through the writer
        writer = MlflowWriter(tracking_uri)
        for f in files:
            writer.log_artifact(writer.adopt_run(pid), f, "report")
        url, key = publish(reader, writer, parent, runs_df, comp, tracking_uri, traces_df,
                           f"report/{DELTA_PNG}" if delta_png is not None else None)
        left = writer.close()
        if not left.complete:
            raise TrackingIncomplete(left, writer.journal_dir)
    return SweepReport(parent_run_id=pid, table=table, text=text, files=files, experiment=experiment,
                       duplicates=dups, comparison=comp, url=url, view_key=key, colours=arm_palette(runs_df))


def render_summary(comp: Comparison) -> str:
    """The lines under the table: the answer, the MDE sentence, the target, one verdict line per arm."""
    lines = [f"answer: {answer_line(comp)}"]
    if comp.mde_sentence:
        lines.append(comp.mde_sentence)
    if math.isfinite(comp.target):
        lines.append(f"target for compute-to-target: val_loss <= {comp.target:.4g} ({comp.target_source})")
    lines += comp.verdicts
    return "\n".join(lines)


def summary_metrics(comp: Comparison) -> dict[str, float]:
    """Per-arm numbers for the parent run, so its chart view is never empty."""
    out: dict[str, float] = {}
    cols = {"value_mean": f"{comp.metric}_mean", "vs_static_delta": f"{comp.metric}_delta_vs_static",
            "vs_static_p_holm": "p_holm_vs_static", "n_finished": "n_finished", "n_diverged": "n_diverged",
            "n_incomplete": "n_incomplete", "attention_rel": "attention_to_target_rel",
            "seconds_rel": "seconds_to_target_rel"}
    for _, r in comp.table[comp.table["phase"] == "compare"].iterrows():
        arm = re.sub(r"[^0-9A-Za-z_\-. /]", "_", str(r["arm"]))
        for col, name in cols.items():
            v = r.get(col)
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                out[f"compare/{arm}/{name}"] = float(v)
    return out


def best_of(params: dict[str, str]) -> dict[str, dict[str, object]]:
    """The parent's ``best.<arm>.<setting>`` params, back as arm -> controller settings."""
    out: dict[str, dict[str, object]] = {}
    for k, v in sorted(params.items()):
        if k.startswith("best."):
            arm, _, setting = k[len("best."):].rpartition(".")
            if arm:
                out.setdefault(arm, {})[setting] = number(v) if math.isfinite(number(v)) else v
    return out


def publish(reader: TrackingReader, writer: MlflowWriter, parent: object, runs_df: pd.DataFrame,
            comp: Comparison, tracking_uri: str, traces_df: pd.DataFrame | None = None,
            delta_png: str | None = None) -> tuple[str, str]:
    """Write what the MLflow UI shows: summary metrics and the description of the parent
    run, each compare trial's difference from static, run colours where missing, the saved
    view (under the sweep's fixed key, so the link printed at its start opens it) and the
    experiment's description (the answer, on the page the link opens). Each UI step is
    skipped quietly where `ui_features` does not vouch for it.

    Args:
        reader, writer: the store.
        parent: the sweep's parent run.
        runs_df, traces_df: from `load_traces`.
        comp: `compare_sweep`'s result.
        tracking_uri: the store's URI (for the link).
        delta_png: the difference chart's artifact path on the parent, or None.

    Returns:
        (link to print, saved view key or "").
    """
    pid, exp_id = parent.info.run_id, reader.experiment_id(parent)  # type: ignore[attr-defined]
    feats = ui_features()
    writer.log_summary(writer.adopt_run(pid), summary_metrics(comp))
    has_compare = bool(len(runs_df)) and bool((runs_df["phase"] == "compare").any())
    static = comp.table.loc[comp.table["verdict"] == "baseline", "arm"]
    if traces_df is not None and len(static):
        for rid, d in per_run_deltas(runs_df, traces_df, comp.metric, str(static.iloc[0])).items():
            writer.log_summary(writer.adopt_run(rid), {delta_key(comp.metric): d})
    trials = reader.trials(pid)
    key = ""
    if feats["saved_view"] and len(runs_df):
        settings = sorted({k for r in trials for k in r.data.metrics if k.startswith("controller.")})
        key = view_key(pid)
        state = view_state(pid, len(runs_df), "compare" if has_compare else "trials", settings, comp.metric)
        if not writer.set_saved_view(exp_id, key, saved_view(state, key)):
            key = ""
    url = experiment_url(tracking_uri, exp_id, key or None)
    if feats["run_color"] and len(runs_df):
        colours = sweep_arm_colours(str(parent.data.tags.get("metalearner.arms", "")),  # type: ignore[attr-defined]
                                    runs_df["arm"])
        for r in trials:
            if RUN_COLOR_TAG not in r.data.tags:
                c = run_colour(r.data.tags.get("metalearner.arm", ""), r.data.tags.get("metalearner.phase", ""), colours)
                if c:
                    writer.set_tags(writer.adopt_run(r.info.run_id), {RUN_COLOR_TAG: c})
    link = url[url.index("#"):]
    old = str(parent.data.tags.get(NOTE_TAG, ""))  # type: ignore[attr-defined]
    note = f"**{answer_line(comp)}**  \n" + "  \n".join(comp.verdicts) + f"  \n[Open the sweep's trials by arm]({link})\n\n"
    if comp.mde_sentence:
        note += comp.mde_sentence + "\n\n"
    note += NOTE_END + ("\n\n" + kept_text(old) if kept_text(old) else "")
    writer.set_tags(writer.adopt_run(pid), {NOTE_TAG: note})
    described = final_description(
        comp, parent.info.run_name, pid, exp_id, link, best_of(parent.data.params),  # type: ignore[attr-defined]
        delta_png, kept_text(reader.experiment_tags(exp_id).get(NOTE_TAG, "")))
    writer.set_experiment_tags(exp_id, {NOTE_TAG: described})
    return url, key


__all__ = [
    "DUPLICATE_COLUMNS", "HOW_TO_READ", "TABLE_COLUMNS", "Comparison", "SweepReport", "answer_line", "best_of",
    "compare_sweep",
    "compare_table", "controller_summary", "display_columns", "publish", "render_summary", "summary_metrics",
    "duplicate_points", "export_best_controller", "load_traces", "plot_traces", "render_duplicates",
    "render_markdown", "render_table", "run_summary", "write_report",
]
