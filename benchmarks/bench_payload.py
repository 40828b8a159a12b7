"""Experiment-folder size and Tune result size, with the trace chunks in the Tune results
(before issue 9) and through the sweep's inbox (now), side by side on the same sweep.

The same small sweep (text task, preset tiny, static and ewma arms x 2 seeds, checkpoints
with every report) runs twice on one local Ray: ``inline`` is the sweep runner with its
inbox switched off (every report then carries its trace chunk, settings and params, as
before), ``inbox`` is the library's sweep runner. Sizes are bytes on disk under the
``--storage`` folder: the Tune experiment folders (checkpoints apart from the rest), the
trials' ``result.json``, the experiment state, and the sweep's own tracking journal (the
MLflow write-ahead log, the same in both). "One Tune result" is one line of a trial's
``result.json`` (Tune's ``config`` included), mean over all lines.

    python benchmarks/bench_payload.py [--quick] [--steps 300] [--report-every 25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metalearner.experiment import parse_experiment  # noqa: E402
from trainables.reporting import PAYLOAD_KEYS  # noqa: E402
from trainables.sweep import SweepRunner  # noqa: E402


class InlineRunner(SweepRunner):
    """The sweep runner without its inbox: the trace chunks ride in the Tune results."""

    def _open_inbox(self) -> None:  # type: ignore[override]
        return None


def spec(steps: int, report_every: int, seeds: list[int]):
    return parse_experiment({
        "name": "payload", "task": {"name": "text"}, "model": {"preset": "tiny", "window": 16},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 64, "report_every": report_every,
                  "eval_every": report_every, "eval_batches": 1},
        "seeds": seeds, "resources": {"cpus_per_trial": 1},
        "arms": [{"name": "static", "controller": {"name": "static"}},
                 {"name": "ewma", "controller": {"name": "ewma", "factor": 1.005, "beta": 0.9, "threshold": 0.01}}],
    })


def tree_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file())


def measure(storage: Path, sweep_folder: Path) -> dict[str, float]:
    tune_dirs = [d for d in storage.iterdir() if d.is_dir() and d != sweep_folder]
    total = sum(tree_bytes(d) for d in tune_dirs)
    ckpt = sum(f.stat().st_size for d in tune_dirs for f in d.rglob("*") if f.is_file()
               and any(p.name.startswith("checkpoint_") for p in f.parents))
    lines = [line for d in tune_dirs for f in d.rglob("result.json") for line in f.read_text().splitlines() if line]
    leaks = sum(1 for line in lines if any(k in json.loads(line) for k in PAYLOAD_KEYS))
    return {
        "Tune folders, all (B)": total,
        "  checkpoints (B)": ckpt,
        "  everything else (B)": total - ckpt,
        "  result.json, all trials (B)": sum(tree_bytes(d, "result.json") for d in tune_dirs),
        "  experiment_state*.json (B)": sum(tree_bytes(d, "experiment_state*.json") for d in tune_dirs),
        "one Tune result, mean (B)": statistics.mean(len(line.encode()) for line in lines),
        "results holding a payload": leaks,
        "results": len(lines),
        "tracking journal (B)": tree_bytes(sweep_folder / "tracking"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, 1 seed: checks the machinery")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--report-every", type=int, default=25)
    args = ap.parse_args()
    steps, every, seeds = (40, 10, [0]) if args.quick else (args.steps, args.report_every, [0, 1])

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-payload-") as tmp:
        for label, runner_cls in (("inline (before)", InlineRunner), ("inbox (now)", SweepRunner)):
            out = Path(tmp) / label.split()[0]
            runner = runner_cls(spec(steps, every, seeds), f"sqlite:///{out}/mlflow.db", storage=str(out / "ray"))
            result = runner.run()
            assert not result.errors, result.errors
            figures[label] = measure(out / "ray", runner.folder)
    ray.shutdown()

    labels = list(figures)
    print(f"sweep: 2 arms x {len(seeds)} seeds, {steps} steps, report (and checkpoint) every {every}")
    print(f"{'':34s}" + "".join(f"{lab:>18s}" for lab in labels) + f"{'ratio':>9s}")
    for key in figures[labels[0]]:
        a, b = figures[labels[0]][key], figures[labels[1]][key]
        ratio = f"{b / a:9.3f}" if a else f"{'-':>9s}"
        print(f"{key:34s}{a:18,.0f}{b:18,.0f}{ratio}")
    non_ckpt = figures[labels[1]]["  everything else (B)"] / figures[labels[0]]["  everything else (B)"]
    print(f"RESULT bench_payload: ratio={non_ckpt:.3f} (Tune files other than checkpoints, inbox / inline); "
          f"results holding a payload now: {figures[labels[1]]['results holding a payload']:.0f} (goal 0)")


if __name__ == "__main__":
    main()
