"""How much of a sweep's wall time is training? (local Ray, 2 CPUs, embedded SQLite MLflow)

Runs 8 equal trials (static controller, preset `tiny`, text task, seeds 0..7, sized so that
each trains ~30 s) through the real sweep path: `parse_experiment({...})` -> `SweepRunner.run()`
on a local Ray started first with ``ray.init(num_cpus=2, include_dashboard=False)`` (start-up
not timed), ``cpus_per_trial: 1`` (two trials at a time), into a fresh ``sqlite:///`` store in a
temp dir (created before timing: its schema migrations take seconds once per store).

    efficiency ratio = sweep wall time / (sum of the trials' own training seconds / 2)

The trials' own training seconds are the ``train_seconds`` each trial reports (time inside
`TrainingRun.advance`: steps plus the evaluations on schedule), read from the Tuner's
ResultGrid. The benchmark subclasses `SweepRunner` only to keep hold of the Tuner it builds and
to add a timing callback next to the sweep's own `MlflowTraceCallback`; the sweep itself is the
library's.

Breakdown of the rest (driver clock, per trial): *start-up* = first result's arrival - trial
start - training seconds in it (actor start or reuse, imports, task unpickling, model build);
*per report* = arrival gap - training seconds between two reports (evaluation outside
advance, checkpoint save + Tune persisting it, report, driver callback); *tail* = completion -
last result; *idle slots* = 2 x Tuner wall - sum of trial spans (scheduling gaps); *driver
outside fit* = sweep wall - Tuner wall (writer, parent run, shared task, final flush). Also
measured apart, outside Ray: the imports of a fresh worker process, one `TrainingRun` build and
one checkpoint save.

    python benchmarks/bench_sweep.py            # 8 trials x ~35 s on 2 slots: 3-5 minutes
    python benchmarks/bench_sweep.py --quick    # 4 short trials: the machinery only

Goal: ratio <= 1.15. On a shared machine other jobs' load stretches the sweep wall (two busy
trials want both cores) more than each trial's own seconds: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402
from ray.tune import Callback  # noqa: E402

from metalearner.config import load_run_config  # noqa: E402
from metalearner.experiment import parse_experiment  # noqa: E402
from metalearner.tasks import build_task  # noqa: E402
from metalearner.tracking import MlflowWriter  # noqa: E402
from metalearner.train import TrainingRun  # noqa: E402
from trainables.sweep import SweepRunner  # noqa: E402

GOAL = 1.15
MARKS = ""  # folder where each trial's worker writes its clock marks (set in main)


def timed_train_trial(config: dict[str, Any], task: Any = None, task_key: tuple | None = None,
                      threads: int = 1, inbox: str | None = None) -> None:
    """The library's `train_trial`, with wall-clock marks written first (runs in the worker;
    pickled by value from this script, so the worker needs nothing from benchmarks/)."""
    import json
    import os
    import time

    entry = time.time()
    import psutil

    created = psutil.Process().create_time()
    from trainables import trial as trial_mod  # torch, metalearner, trainables (if not loaded yet)

    imported = time.time()
    cell = config.get("cell", config)
    seed = cell.get("train", {}).get("seed")
    with open(os.path.join(MARKS, f"{os.getpid()}-{seed}.json"), "w") as fh:
        json.dump({"pid": os.getpid(), "seed": seed, "created": created, "entry": entry, "imported": imported}, fh)
    trial_mod.train_trial(config, task=task, task_key=task_key, threads=threads, inbox=inbox)


HOOKS = [m for m in dir(Callback) if m.startswith(("on_", "setup")) and callable(getattr(Callback, m))]


class TimingCallback(Callback):
    """Driver-side clock of each trial: start, every result's arrival, completion."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.results: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
        self.end: dict[str, float] = {}
        self.seed: dict[str, Any] = {}
        self.checkpoints: dict[str, int] = defaultdict(int)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.start[trial.trial_id] = time.time()
        cell = trial.config.get("cell", trial.config)
        self.seed[trial.trial_id] = cell.get("train", {}).get("seed")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results[trial.trial_id].append((time.time(), float(result["train_seconds"]), int(result["step"])))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self.checkpoints[trial.trial_id] += 1

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end[trial.trial_id] = time.time()


class Tee(Callback):
    """Sends every Tune hook to the sweep's own callback, then to the timing one."""

    def __init__(self, *callbacks: Callback) -> None:
        self.callbacks = callbacks

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config; keep it cheap
        return {"callbacks": ()}


def _forward(name: str) -> Any:
    def hook(self: Tee, *args: Any, **kwargs: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in HOOKS:
    setattr(Tee, _name, _forward(_name))


class TimedFit:
    """The Tuner of a sweep's phase, with its fit() timed."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner
        self.seconds = 0.0
        self.began = self.ended = 0.0
        self.grid: Any = None

    def fit(self) -> Any:
        self.began = time.time()
        self.grid = self.tuner.fit()
        self.ended = time.time()
        self.seconds = self.ended - self.began
        return self.grid


class TimedSweepRunner(SweepRunner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timing = TimingCallback()
        self.fits: list[TimedFit] = []

    def _trainable(self, task: Any, task_key: tuple | None) -> Any:
        # SweepRunner._trainable wraps trainables.trial.train_trial: hand it the timed one
        import trainables.trial as trial_mod

        original = trial_mod.train_trial
        trial_mod.train_trial = timed_train_trial
        try:
            return super()._trainable(task, task_key)
        finally:
            trial_mod.train_trial = original

    def run(self) -> Any:
        # each phase's Tuner comes from trainables.tuning.make_tuner (through the phase
        # runner): hand the phases a timed one, whose callback also feeds the timing
        import trainables.phase_runner as phase_runner

        original = phase_runner.make_tuner

        def timed_tuner(spec: Any, storage: str, trainable: Any, param_space: dict[str, Any], name: str,
                        callback: Any, **kw: Any) -> TimedFit:
            fit = TimedFit(original(spec, storage, trainable, param_space, name, Tee(callback, self.timing), **kw))
            self.fits.append(fit)
            return fit

        phase_runner.make_tuner = timed_tuner
        try:
            return super().run()
        finally:
            phase_runner.make_tuner = original


def spec_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "bench-sweep",
        "description": "benchmarks/bench_sweep.py: equal static trials",
        "task": {"name": args.task},
        "model": {"preset": args.preset},
        "train": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len,
                  "report_every": args.report_every, "eval_every": args.report_every, "eval_batches": 2,
                  "warmup_steps": 10},
        "controller": {"name": "static"},
        "seeds": list(range(args.trials)),
        "resources": {"cpus_per_trial": 1},
    }


def worker_imports() -> float:
    """Seconds a fresh Python process spends importing what a trial worker needs."""
    code = ("import time; t = time.time(); import torch, ray.tune, metalearner.train, trainables.trial; "
            "print(time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.strip().splitlines()[-1])


def local_costs(spec: Any, tmp: Path) -> dict[str, float]:
    """One TrainingRun build and one checkpoint save of a trial's config, outside Ray."""
    cfg = load_run_config(spec.run_config(spec.arms[0], spec.seeds[0]))
    t = cfg.train
    task = build_task(cfg.task, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, eval_batches=t.eval_batches)
    start = time.time()
    run = TrainingRun(cfg, task=task)
    build = time.time() - start
    run.advance(2)
    saves = []
    for i in range(5):
        start = time.time()
        run.save(tmp / f"ckpt{i}")
        saves.append(time.time() - start)
    size = (tmp / "ckpt0" / "checkpoint.pt").stat().st_size
    start = time.time()
    run.evaluate()
    evaluate = time.time() - start
    return {"build": build, "save": statistics.median(saves), "size": size, "evaluate": evaluate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 trials of 60 steps")
    parser.add_argument("--trials", type=int, default=8, help="equal trials (seeds 0..n-1)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--task", default="text", choices=["text", "recall"])
    parser.add_argument("--steps", type=int, default=600, help="steps per trial (~30 s each for tiny/text)")
    parser.add_argument("--report-every", type=int, default=50, help="steps between reports (= eval_every)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.trials, args.steps, args.report_every = 4, 60, 20
    torch.set_num_threads(1)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # the sweep turns Tune's result.json/progress.csv loggers off (MLflow holds the traces),
    # so building the ResultGrid warns that it cannot read them; the in-memory results are used
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    spec = parse_experiment(spec_dict(args))

    global MARKS
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        MARKS = str(tmp / "marks")
        Path(MARKS).mkdir()
        imports = worker_imports()
        local = local_costs(spec, tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        start = time.time()
        writer = MlflowWriter(uri)  # create the store (schema migrations) before timing
        writer.delivery.experiment_id(spec.name)
        writer.close()
        store = time.time() - start

        import ray

        start = time.time()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        ray_start = time.time() - start
        try:
            runner = TimedSweepRunner(spec, uri, storage=str(tmp / "ray"), progress=False)
            start = time.time()
            result = runner.run()
            wall = time.time() - start
        finally:
            ray.shutdown()
        marks = {(m["seed"]): m for m in (json.loads(f.read_text()) for f in Path(MARKS).glob("*.json"))}
    if result.errors:
        raise SystemExit(f"sweep failed: {result.errors[0]}")

    (fit,) = runner.fits
    grid = fit.grid
    train = {r.metrics["trial_id"]: float(r.metrics["train_seconds"]) for r in grid}
    tm = runner.timing
    rows = []
    for tid in sorted(train, key=lambda k: tm.start[k]):
        res = tm.results[tid]
        startup = res[0][0] - tm.start[tid] - res[0][1]
        gaps = [(b[0] - a[0]) - (b[1] - a[1]) for a, b in zip(res, res[1:])]
        mk = marks.get(tm.seed[tid], {})
        rows.append({"tid": tid, "seed": tm.seed[tid], "pid": mk.get("pid", 0), "mark": mk,
                     "train": train[tid], "span": tm.end[tid] - tm.start[tid],
                     "startup": startup, "per_report": statistics.mean(gaps) if gaps else 0.0,
                     "reports": len(res), "tail": tm.end[tid] - res[-1][0],
                     "began": tm.start[tid] - tm.start[rows[0]["tid"]] if rows else 0.0})
    total_train = sum(train.values())
    ideal = total_train / 2
    ratio = wall / ideal
    print(f"{len(rows)} trials: preset {args.preset}, {args.task} task, {args.steps} steps, batch {args.batch}, "
          f"seq_len {args.seq_len}, report (+eval, +checkpoint) every {args.report_every}; 2 CPUs, 1 per trial")
    print(f"  {'trial':<12} {'seed':>4} {'pid':>7} {'began s':>8} {'train s':>8} {'span s':>7} {'startup s':>9} "
          f"{'ms/report':>9} {'reports':>7} {'tail ms':>7}")
    for r in rows:
        print(f"  {r['tid']:<12} {r['seed']:>4} {r['pid']:>7} {r['began']:8.1f} {r['train']:8.2f} {r['span']:7.2f} "
              f"{r['startup']:9.2f} {r['per_report'] * 1e3:9.1f} {r['reports']:>7} {r['tail'] * 1e3:7.0f}")
    spans = sum(r["span"] for r in rows)
    startup = sum(r["startup"] for r in rows)
    reports = sum(r["per_report"] * (r["reports"] - 1) for r in rows)
    tails = sum(r["tail"] for r in rows)
    first_start = min(tm.start.values()) - fit.began
    last_end = fit.ended - max(tm.end.values())
    idle = 2 * fit.seconds - spans
    outside = wall - fit.seconds
    over = 2 * wall - total_train  # slot-seconds not spent training
    print(f"\n  sweep wall (SweepRunner.run) {wall:.1f} s; Tuner.fit {fit.seconds:.1f} s; "
          f"sum of train_seconds {total_train:.1f} s -> ideal on 2 slots {ideal:.1f} s")
    print(f"  slot-seconds not training: {over:.1f} s = {over / len(rows):.2f} s per trial, of which")
    print(f"    start-up before the first report  {startup:7.1f} s  ({startup / len(rows):.2f} s/trial; "
          f"the first trial on each worker also starts the process)")
    print(f"    between reports (outside advance) {reports:7.1f} s  "
          f"({reports / max(1, sum(r['reports'] - 1 for r in rows)) * 1e3:.0f} ms/report)")
    print(f"    after the last report             {tails:7.1f} s")
    print(f"    idle slots inside Tuner.fit       {idle:7.1f} s  (2 x fit - sum of spans), of which "
          f"2 x {first_start:.1f} s before the first trial started and 2 x {last_end:.1f} s after the last "
          f"one completed")
    print(f"    driver outside Tuner.fit          {2 * outside:7.1f} s  (2 x {outside:.1f} s: writer, parent run, "
          f"shared task, Tuner set-up/teardown, final flush)")
    seen: set[int] = set()
    for r in rows:  # the first trial of each worker process: where its cold start went
        mk = r["mark"]
        if not mk or mk["pid"] in seen:
            continue
        seen.add(mk["pid"])
        first = tm.results[r["tid"]][0]
        t0 = fit.began
        created = (f"process created {mk['created'] - t0:+.1f} s after fit began"
                   if mk["created"] >= t0 else f"process prestarted {t0 - mk['created']:.1f} s before fit")
        print(f"  cold start, worker pid {mk['pid']} (seed {r['seed']}): {created}; Tune actor up "
              f"(on_trial_start) {tm.start[r['tid']] - t0:+.1f} s; trial function entered {mk['entry'] - t0:+.1f} s "
              f"(after unpickling the shared task, which imports torch + metalearner); trainables.trial import "
              f"{mk['imported'] - mk['entry']:.1f} s; first report {first[0] - t0:+.1f} s, of which training "
              f"{first[1]:.1f} s (the rest: TrainingRun build, first checkpoint, report)")
    print(f"  measured apart: fresh worker imports {imports:.2f} s; first TrainingRun build in a process {local['build'] * 1e3:.0f} ms; "
          f"checkpoint save {local['save'] * 1e3:.1f} ms ({local['size'] / 1e3:.0f} kB); "
          f"one evaluate() {local['evaluate'] * 1e3:.0f} ms")
    print(f"  not timed: ray.init {ray_start:.1f} s; fresh SQLite store {store:.1f} s")
    print(f"  ratio = {wall:.1f} / {ideal:.1f} = {ratio:.3f}")
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"RESULT sweep: ratio={ratio:.3f} goal<={GOAL} ({verdict})", flush=True)


if __name__ == "__main__":
    main()
