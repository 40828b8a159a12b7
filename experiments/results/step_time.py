"""Seconds per training step of a spec's model at several windows: the figures a study is sized by.

    python experiments/results/step_time.py experiments/study_long.yaml [--windows 32,64,128,256,512]
        [--steps 6] [--threads 1]

Builds the spec's run config (its first arm, seed 0) with the window held fixed (a static
controller at each window: ``min_window = max_window = w``), times ``--steps`` optimizer
steps after 2 warm-up steps (median) and one evaluation (``train.eval_batches`` batches),
on ``--threads`` torch threads: one Ray trial's share of the machine (``cpus_per_trial: 1``).
Prints the model's parameter count, the load average and one line per window. Study 3's
sizing (experiments/study_long.yaml) used it; run it on the machine that will run the study,
ideally idle, and scale the spec comments' arithmetic by what it prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from metalearner.config import load_run_config
from metalearner.experiment import load_experiment
from metalearner.train import TrainingRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="an experiment spec, e.g. experiments/study_long.yaml")
    ap.add_argument("--windows", default="32,64,128,256,512", help="windows to time, comma separated")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per window (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial's CPUs)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = load_experiment(a.spec)
    print(f"{spec.name}: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {a.threads} thread(s)")
    for w in (int(x) for x in a.windows.split(",")):
        cfg = spec.run_config(spec.arms[0], 0, controller={"name": "static", "min_window": w, "max_window": w})
        run = TrainingRun(load_run_config(cfg))
        for _ in range(2):
            run.train_step()
        times = []
        for _ in range(a.steps):
            start = time.perf_counter()
            run.train_step()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        run.evaluate()
        n = sum(p.numel() for p in run.model.parameters())
        print(f"  {n:,} parameters  T={run.cfg.train.seq_len} batch={run.cfg.train.batch_size} window {w:>4}: "
              f"{statistics.median(times) * 1e3:6.0f} ms/step (min {min(times) * 1e3:.0f}), "
              f"evaluation {(time.perf_counter() - start) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
