"""What does journaling cost the MLflow write path? (CPU, embedded SQLite store)

Side by side, interleaved (a, b, a, b, ...), each on a fresh ``sqlite:///`` file:

* ``journaled``  `MlflowWriter`: the producer journals each report chunk of rows
                 (`log_rows`, one append and fsync per chunk, as the Tune callback does per
                 result) and hands the records to the delivery thread, which sends them
                 with ``log_batch``; timed from the
                 first point to `close()` returning (every point stored, watermark saved);
* ``direct``     the same points sent with ``MlflowClient.log_batch`` (1000 per call) on
                 the caller's thread: no journal, no thread; the store's own floor.

Reported: points/s of each, their ratio, and the producer's cost per report chunk in the
journaled path (the time the Tune callback spends, fsync included).

    python benchmarks/bench_journal.py            # ~1 minute on a quiet machine
    python benchmarks/bench_journal.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import mlflow  # noqa: E402

from metalearner.trace import TRACE_KEYS as KEYS  # noqa: E402
from metalearner.tracking import MlflowWriter  # noqa: E402

CHUNK = 25  # steps per report, as a trial sends them


def journaled(folder: Path, runs: int, steps: int) -> tuple[float, float]:
    w = MlflowWriter(f"sqlite:///{folder}/j.db", journal_dir=folder / "tracking")
    keys = [w.create_run("bench", f"r{i}", key=f"r{i}") for i in range(runs)]
    produce = 0.0
    t0 = time.perf_counter()
    for start in range(1, steps + 1, CHUNK):
        for k in keys:
            t1 = time.perf_counter()
            w.log_rows(k, [{"step": s, **{key: 1.0 / s for key in KEYS}}
                           for s in range(start, min(start + CHUNK, steps + 1))])
            w.flush(k)
            produce += time.perf_counter() - t1
    assert w.close().complete
    return time.perf_counter() - t0, produce / (runs * ((steps + CHUNK - 1) // CHUNK))


def direct(folder: Path, runs: int, steps: int) -> float:
    client = mlflow.MlflowClient(f"sqlite:///{folder}/d.db")
    exp = client.create_experiment("bench")
    ids = [client.create_run(exp, run_name=f"r{i}").info.run_id for i in range(runs)]
    Metric = mlflow.entities.Metric
    t0 = time.perf_counter()
    for start in range(1, steps + 1, CHUNK):
        for rid in ids:
            ts = int(time.time() * 1000)
            pts = [Metric(key, 1.0 / s, ts, s) for s in range(start, min(start + CHUNK, steps + 1)) for key in KEYS]
            for i in range(0, len(pts), 1000):
                client.log_batch(rid, metrics=pts[i: i + 1000])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.steps, a.repeats = 2, 100, 1
    points = a.runs * a.steps * len(KEYS)
    tj, td, per_chunk = [], [], []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            t, c = journaled(Path(d), a.runs, a.steps)
            tj.append(t)
            per_chunk.append(c)
        with tempfile.TemporaryDirectory() as d:
            td.append(direct(Path(d), a.runs, a.steps))
    j, dr = statistics.median(tj), statistics.median(td)
    print(f"{points} points ({a.runs} runs x {a.steps} steps x {len(KEYS)} keys), median of {a.repeats}:")
    print(f"  journaled  {points / j:10.0f} points/s   ({j:.2f} s to close)")
    print(f"  direct     {points / dr:10.0f} points/s   ({dr:.2f} s)")
    print(f"  ratio journaled/direct throughput: {dr / j:.2f}")
    print(f"  producer cost per {CHUNK}-step chunk (journaled, fsync included): "
          f"{statistics.median(per_chunk) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
