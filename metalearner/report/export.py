"""Export the best configuration of a sweep as a controller spec (``--controller-spec``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from metalearner.report.compare import compare_table
from metalearner.report.runs import controller_settings, parse_value, run_summary


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


def best_params(arm: str, controller: dict[str, Any]) -> dict[str, Any]:
    """A searched arm's best controller as params of the sweep's parent run.

    Args:
        arm: the arm's name.
        controller: its best controller (``{"name": ..., <settings>}``).

    Returns:
        ``{"best.<arm>.<setting>": value}``, unset (None) settings left out.
    """
    return {f"best.{arm}.{k}": v for k, v in controller.items() if v is not None}


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
    spec: dict[str, Any] = {"name": parse_value(run.get("controller.name")) or "static"}
    for key, value in sorted(controller_settings(run).items()):
        node = spec
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    doc = {"controller": spec}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc

