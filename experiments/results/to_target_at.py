"""Compute to target at other targets than the spec's, from a study's MLflow store.

    python experiments/results/to_target_at.py SWEEP --tracking-uri URI --targets 4.0,3.5 [--baseline ARM]

For each target: per arm, how many seeds reached it, at which step (mean), and the
attention compute (the local-window cost model `metalearner compare` uses) relative to
``--baseline`` with its 95% stratified-bootstrap interval. Prints a markdown table per
target. Used for RESULTS.md when static never reaches the spec's target (recall: static
stays at the chance plateau, so "relative to static" is undefined there).
"""

from __future__ import annotations

import argparse

import numpy as np

from metalearner.report import load_traces
from metalearner.report.compare import to_target
from metalearner.tracking import TrackingReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="the study's name (its latest sweep) or the parent run id")
    ap.add_argument("--tracking-uri", required=True, help="the study's MLflow store")
    ap.add_argument("--targets", required=True, help="val losses, comma separated, e.g. 4.0,3.5")
    ap.add_argument("--baseline", default="static", help="arm the relative compute is measured against")
    a = ap.parse_args()
    parent = TrackingReader(a.tracking_uri).find_sweep(a.sweep)
    runs, traces = load_traces(a.tracking_uri, parent.info.run_id, keys=("window", "val_loss", "train_seconds"))
    ids = runs.loc[runs["phase"] == "compare", "run_id"].tolist()
    for target in (float(t) for t in a.targets.split(",")):
        per_run, per_arm = to_target(runs, traces, ids, target, a.baseline)
        print(f"\nval_loss <= {target:g} (relative to {a.baseline}):\n")
        print("| arm | reached | step (mean of reached) | attention to target vs baseline |")
        print("|---|---|---|---|")
        for arm, r in per_arm.iterrows():
            steps = per_run.loc[(per_run["arm"] == arm) & per_run["reached"], "step"]
            rel = r["attention_rel"]
            rel_s = ("reference" if arm == a.baseline else
                     f"{rel:.2f}x [{r['attention_rel_low']:.2f}, {r['attention_rel_high']:.2f}]" if np.isfinite(rel)
                     else "n/a (not every seed reached it)")
            print(f"| {arm} | {int(r['n_reached'])}/{int(r['n_runs'])} | "
                  f"{steps.mean():.0f} | {rel_s} |" if len(steps) else
                  f"| {arm} | 0/{int(r['n_runs'])} | never | {rel_s} |")


if __name__ == "__main__":
    main()
