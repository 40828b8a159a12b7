"""Read a sweep back from MLflow and say, honestly, which controller did better.

``metalearner compare NAME-or-run-id`` lands here. Pipeline::

    TrackingReader.find_sweep -> runs.load_traces -> (runs_df, traces_df)
        -> runs.duplicate_points         the trace audit (one point per step per key?)
        -> compare.compare_table         -> render.render_table / render_markdown
        -> plots.plot_traces
        -> export.export_best_controller
    write_report = all of it, written to a folder and logged back to the parent run.

One job per module: `runs` shapes what `metalearner.tracking` (the only module that talks
to MLflow) returns into frames, `stats` holds the statistics, `compare` builds the table,
`render` turns it into text, `plots` draws, `export` writes the best controller spec.
Never imports ray or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from metalearner.report.compare import TABLE_COLUMNS, compare_table
from metalearner.report.export import export_best_controller
from metalearner.report.plots import plot_traces
from metalearner.report.render import HOW_TO_READ, render_duplicates, render_markdown, render_table
from metalearner.report.runs import (
    DUPLICATE_COLUMNS,
    controller_summary,
    duplicate_points,
    load_traces,
    run_summary,
)
from metalearner.tracking import TrackingReader


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
    """

    parent_run_id: str
    table: pd.DataFrame
    text: str
    files: list[Path] = field(default_factory=list)
    experiment: str = ""
    duplicates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DUPLICATE_COLUMNS))


def write_report(tracking_uri: str, name_or_run_id: str, out_dir: str | Path,
                 log_to_mlflow: bool = True) -> SweepReport:
    """Find a sweep, build its comparison and plots, write them to ``out_dir`` and (by
    default) log them as artifacts of the sweep's parent run under ``report/``.

    Files: ``comparison.csv`` (the full table), ``comparison.md`` (markdown table, trace
    audit and how to read it), ``duplicates.csv`` (only when a trace holds a step more
    than once), ``best_controller.yaml`` (when an arm has a final val loss) and the plots.

    Raises:
        ValueError: one line, when no sweep matches ``name_or_run_id``.
    """
    reader = TrackingReader(tracking_uri)
    parent = reader.find_sweep(name_or_run_id)
    pid = parent.info.run_id
    experiment = reader.experiment_name(parent)
    runs_df, traces_df = load_traces(tracking_uri, pid)
    table = compare_table(runs_df, traces_df)
    dups = duplicate_points(traces_df)
    audit = render_duplicates(dups, runs_df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_cmp = int((runs_df["phase"] == "compare").sum()) if len(runs_df) else 0
    header = (f"sweep {experiment!r} (parent run {pid}): {len(runs_df)} trials, "
              f"{n_cmp} in the equal-steps comparison")
    text = "\n".join([header, "", render_table(table), "", audit, "", HOW_TO_READ])

    files = []
    csv = out / "comparison.csv"
    table.to_csv(csv, index=False)
    md = out / "comparison.md"
    md.write_text(f"# Sweep `{experiment}`\n\nParent run `{pid}` in `{tracking_uri}`: {len(runs_df)} trials, "
                  f"{n_cmp} in the equal-steps comparison.\n\n{render_markdown(table)}\n\n"
                  f"```\n{audit}\n```\n\n{HOW_TO_READ}\n")
    files += [csv, md]
    if len(dups):
        dup_csv = out / "duplicates.csv"
        dups.to_csv(dup_csv, index=False)
        files.append(dup_csv)
    if (table["phase"] == "compare").any() and table["final_val_loss_mean"].notna().any():
        best = out / "best_controller.yaml"
        export_best_controller(runs_df, traces_df, best)
        files.append(best)
    files += plot_traces(runs_df, traces_df, out)
    if log_to_mlflow:
        reader.log_artifacts(pid, files, "report")
    return SweepReport(parent_run_id=pid, table=table, text=text, files=files, experiment=experiment,
                       duplicates=dups)


__all__ = [
    "DUPLICATE_COLUMNS", "HOW_TO_READ", "TABLE_COLUMNS", "SweepReport", "compare_table", "controller_summary",
    "duplicate_points", "export_best_controller", "load_traces", "plot_traces", "render_duplicates",
    "render_markdown", "render_table", "run_summary", "write_report",
]
