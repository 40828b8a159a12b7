"""Statistics for comparing controller policies over seeds: intervals, Holm, power, compute.

What this package is for: everything ``metalearner compare`` needs to say, at the strength
the data allow, whether an arm (a controller policy run once per seed) differs from the
baseline arm (static), and what it cost in attention compute and wall-clock to reach a
target loss. It reads plain arrays and pandas frames and returns numbers, frames and
sentences; it never prints. It imports numpy, scipy and pandas only, and must not import
mlflow, ray or torch (reading runs, computing statistics and drawing plots are three
modules). One job per module, each stating its decisions (tested in
``tests/test_stats.py``):

* `intervals` — the mean with its 95% t interval, the IQM (n >= 5), percentile bootstraps
  over seeds (plain, and stratified by arm for statistics that combine arms).
* `pairing` — counts runs by status and pairs each arm's seeds with the baseline's, never
  dropping a seed (paired / missing / lost / won / both_diverged).
* `verdicts` — the one decision rule: two-sided paired t tests against the baseline, Holm
  over the arms (family-wise alpha = 0.05), a diverged seed vetoing "better".
* `power` — the minimum detectable effect at Holm's most stringent level, and its sentence.
* `to_target` — the attention cost model (query-key pairs of the local-window band) and the
  attention compute and seconds to reach a target loss.

This module only gathers their public names, so ``stats.holm`` etc. read as one namespace.
"""

from __future__ import annotations

from metalearner.report.stats.intervals import (
    IQM_MIN_N,
    N_BOOT,
    ArmSummary,
    bootstrap_ci,
    ci95,
    finite,
    iqm,
    mean,
    stratified_bootstrap_ci,
    summarize_arm,
)
from metalearner.report.stats.pairing import PAIR_CATEGORIES, STATUSES, count_runs, pair_with_baseline
from metalearner.report.stats.power import mde_paired, mde_sentence, power_paired
from metalearner.report.stats.to_target import (
    ToTarget,
    attention_cost,
    baseline_target,
    compute_to_target,
    run_to_target,
)
from metalearner.report.stats.verdicts import (
    VERDICTS,
    compare_with_baseline,
    holm,
    holm_verdicts,
    no_verdict,
    paired_t,
)

__all__ = [
    "IQM_MIN_N",
    "N_BOOT",
    "PAIR_CATEGORIES",
    "STATUSES",
    "VERDICTS",
    "ArmSummary",
    "ToTarget",
    "attention_cost",
    "baseline_target",
    "bootstrap_ci",
    "ci95",
    "compare_with_baseline",
    "compute_to_target",
    "count_runs",
    "finite",
    "holm",
    "holm_verdicts",
    "iqm",
    "mde_paired",
    "mde_sentence",
    "mean",
    "no_verdict",
    "pair_with_baseline",
    "paired_t",
    "power_paired",
    "run_to_target",
    "stratified_bootstrap_ci",
    "summarize_arm",
]
