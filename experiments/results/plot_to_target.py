"""Compute-to-target plot of a study, from the report folder `metalearner compare --out` wrote.

    python experiments/results/plot_to_target.py REPORT_DIR OUT.png [TITLE]

Left: attention FLOPs each run spent to reach the target val loss (one dot per seed; runs
that never reached it are drawn at the right edge as crosses). Right: the same in training
seconds (the CPU was shared, so seconds are noisier than FLOPs). The arm's bar is the
95% interval of `metalearner compare` (``attention_to_target_low/high``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot(report_dir: Path, out: Path, title: str = "") -> Path:
    """Write the two-panel compute-to-target figure.

    Args:
        report_dir: a folder holding ``to_target.csv`` and ``comparison.csv``.
        out: the PNG to write.
        title: the study's name for the title (default: the report folder's name).
    Returns:
        ``out``.
    """
    runs = pd.read_csv(report_dir / "to_target.csv")
    table = pd.read_csv(report_dir / "comparison.csv")
    table = table[table["phase"] == "compare"]
    arms = list(table["arm"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(arms) + 1.8), sharey=True)
    for ax, col, label, lo, hi in ((axes[0], "attention", "attention FLOPs to target", "attention_to_target_low",
                                    "attention_to_target_high"),
                                   (axes[1], "seconds", "training seconds to target", "seconds_to_target_low",
                                    "seconds_to_target_high")):
        edge = runs[col].max() * 1.1 if runs[col].notna().any() else 1.0
        for y, arm in enumerate(arms):
            mine = runs[runs["arm"] == arm]
            hit = mine[mine["reached"].astype(bool)]
            miss = mine[~mine["reached"].astype(bool)]
            ax.scatter(hit[col], [y] * len(hit), color=f"C{y}", zorder=3)
            ax.scatter([edge] * len(miss), [y] * len(miss), color=f"C{y}", marker="x", zorder=3)
            row = table[table["arm"] == arm].iloc[0]
            if pd.notna(row.get(lo)) and pd.notna(row.get(hi)):
                ax.plot([row[lo], row[hi]], [y, y], color=f"C{y}", linewidth=6, alpha=0.3)
        ax.set_xlabel(label + "  (x: never reached)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(arms)), arms)
    fig.suptitle(f"{title or report_dir.name}: compute to the target val loss, one dot per seed")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4]))
