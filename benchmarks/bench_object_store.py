"""Private memory per Ray worker for the speech task's features: a torch tensor (before
issue 9: every worker unpickles its own copy) vs one numpy array (now: a read-only view of
the node's object-store copy), side by side, 2 workers each.

A corpus of seeded noise clips (1.2-3.0 s, 16 kHz; no speech synthesizer needed: only the
feature bytes matter here) becomes a `SpeechTask` on the driver. For each variant the task
is ``ray.put`` once (what ``tune.with_parameters`` does) and 2 actors with 1 CPU each stand
in for 2 trials: each takes the task as a trial does (``ray.get`` + `shared_task`), reads
every feature once (pages it in) and draws a batch. Each reports its USS (memory only it
holds), PSS (shared pages split among the processes mapping them) and RSS, as psutil
reads them, before and after; the figure is the increase.

    python benchmarks/bench_object_store.py [--quick] [--clips 2000]
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 1 << 20


def noise_corpus(folder: Path, n: int, seed: int = 0) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"clip{i:05d}.wav"
        seconds = rng.uniform(1.2, 3.0)
        sf.write(folder / name, (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000)
        rows.append((name, " ".join(str(d) for d in rng.integers(0, 10, 4))))
    with open(folder / "metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file_name", "transcription"), *rows])
    return folder


class Trial:
    """Stands in for one trial's worker: takes the task as the trainable does."""

    def memory(self) -> dict[str, float]:
        import psutil

        m = psutil.Process().memory_full_info()
        return {"uss": m.uss / MB, "pss": m.pss / MB, "rss": m.rss / MB}

    def load(self, refs: list, key: tuple, cfg: object) -> dict[str, float]:
        import ray

        from trainables.reporting import shared_task

        before = self.memory()
        self.task = shared_task(ray.get(refs[0]), key, cfg)
        feats = self.task._features
        total = 0.0
        for start in range(0, feats.shape[1], 4096):  # read every byte once
            total += float(np.asarray(feats[:, start:start + 4096], dtype=np.float32).sum())
        self.task.train_batch(1)
        after = self.memory()
        return {k: after[k] - before[k] for k in after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 clips: checks the machinery")
    ap.add_argument("--clips", type=int, default=2000)
    args = ap.parse_args()
    n = 200 if args.quick else args.clips

    import ray
    import torch

    from metalearner.config import load_run_config
    from metalearner.tasks import build_task
    from trainables.reporting import task_key

    with tempfile.TemporaryDirectory(prefix="bench-object-store-") as tmp:
        cfg_dict = {"task": {"name": "speech", "data_dir": str(noise_corpus(Path(tmp), n))},
                    "train": {"batch_size": 16, "seed": 0}}
        cfg = load_run_config(cfg_dict)
        t = cfg.train
        task = build_task(cfg.task, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, eval_batches=1)
    feat_mb = task._features.nbytes / MB
    before = copy.copy(task)
    before._features = torch.from_numpy(task._features.copy())  # the layout before: a tensor
    variants = {"tensor (before)": before, "numpy (now)": task}

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    actor = ray.remote(num_cpus=1)(Trial)
    figures = {}
    for label, variant in variants.items():
        ref = ray.put(variant)
        trials = [actor.remote() for _ in range(2)]
        deltas = ray.get([a.load.remote([ref], task_key(cfg), cfg) for a in trials])
        figures[label] = {k: statistics.mean(d[k] for d in deltas) for k in ("uss", "pss", "rss")}
        for a in trials:
            ray.kill(a)
        del ref
    ray.shutdown()

    print(f"speech features: {n} clips, {task._features.shape[1]:,} frames x {task._features.shape[0]} mels, "
          f"float16: {feat_mb:.1f} MiB; 2 workers per variant, increase per worker (MiB)")
    labels = list(figures)
    print(f"{'':22s}" + "".join(f"{lab:>18s}" for lab in labels))
    for k, what in (("uss", "USS (private)"), ("pss", "PSS"), ("rss", "RSS")):
        print(f"{what:22s}" + "".join(f"{figures[lab][k]:18.1f}" for lab in labels))
    ratio = figures[labels[1]]["uss"] / figures[labels[0]]["uss"]
    print(f"RESULT bench_object_store: ratio={ratio:.3f} (private MiB per worker, numpy / tensor) goal<=0.2 "
          f"({'met' if ratio <= 0.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
