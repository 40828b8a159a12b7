"""The `metalearner` command line: train, sweep, compare, data.

Bad input (unknown key, wrong type, out-of-range value, missing file) exits with code 2
and one line naming the field, before any training or Ray start.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from metalearner.config import ConfigError
from metalearner.inputs import OneLineParser, compare_inputs, data_inputs, sweep_inputs, train_inputs

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
RUN_ID_FILE = "mlflow_run_id"  # in --checkpoint-dir: the MLflow run that --resume continues


def fail(message: str) -> NoReturn:
    print(f"metalearner: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = train_inputs(args)  # every input checked: exit 2 before anything starts
    except ConfigError as e:
        fail(str(e))
    if args.resume and not args.checkpoint_dir:
        fail("--resume: needs --checkpoint-dir DIR holding an earlier run's checkpoint")
    if not args.no_mlflow:
        from metalearner.tracking import resolve_tracking_uri

        check_tracking_access(resolve_tracking_uri(args.tracking_uri), args.experiment)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if cfg.train.engine == "hf":
        return train_hf(cfg, args, ckpt_dir)

    from metalearner.train import CHECKPOINT_FILE, CheckpointError, train

    run = build_run(cfg)
    resume_id = None
    if args.resume:
        if not (ckpt_dir / CHECKPOINT_FILE).is_file():
            fail(f"--checkpoint-dir: got {str(ckpt_dir)!r}, expected a folder with {CHECKPOINT_FILE}")
        try:
            run.load(ckpt_dir, same_config=True)
        except (ConfigError, CheckpointError) as e:
            fail(str(e))
        resume_id = read_run_id(ckpt_dir)

    sink, mlflow_sink, uri = open_sinks(args, cfg, run.task, ckpt_dir, resume_id)
    if resume_id is None:
        sink.log_params(run.params())
    return run_traced(args, cfg, sink, mlflow_sink, uri, lambda: train(run, sink, checkpoint_dir=ckpt_dir))


def train_hf(cfg: Any, args: argparse.Namespace, ckpt_dir: Path | None) -> int:
    """``metalearner train --engine hf``: the same sinks, params, MLflow run naming and
    summary as the PyTorch engine, with `metalearner.hf.run_hf` training.

    Checkpoints go to ``--checkpoint-dir`` (every ``train.checkpoint_every`` steps and at
    the end); without it the Trainer works in a temporary folder and saves nothing.
    ``--resume`` continues from the latest ``checkpoint-<step>`` there, in the same MLflow run.
    """
    try:

        from metalearner.hf import PREFIX_CHECKPOINT_DIR, checkpoints, run_hf
        from metalearner.train import CheckpointError, read_run_state
    except RuntimeError as e:  # the hf extra is missing
        fail(f"train.engine: got 'hf', {e}")

    resume_id = None
    if args.resume:
        if not ckpt_dir.is_dir() or not checkpoints(ckpt_dir):
            fail(f"--checkpoint-dir: got {str(ckpt_dir)!r}, expected a folder with {PREFIX_CHECKPOINT_DIR}-<step> folders")
        resume_id = read_run_id(ckpt_dir)
        try:  # the same refusal as the torch engine's: a differing config, an unreadable state
            read_run_state(checkpoints(ckpt_dir)[-1], cfg)
        except (ConfigError, CheckpointError) as e:
            fail(str(e))
    task = build_run(cfg).task  # task and model built once up front: bad input exits 2 before MLflow starts
    sink, mlflow_sink, uri = open_sinks(args, cfg, task, ckpt_dir, resume_id)

    def body() -> Any:
        with tempfile.TemporaryDirectory(prefix="metalearner-hf-") as scratch:
            return run_hf(cfg, sink, ckpt_dir or scratch, resume=bool(args.resume), task=task,
                          save_checkpoints=ckpt_dir is not None, log_params=resume_id is None,
                          progress=sys.stderr.isatty())

    return run_traced(args, cfg, sink, mlflow_sink, uri, body)


def check_tracking_access(uri: str, experiment: str) -> None:
    """A tracking server that refuses the credentials (401) or the writes (403) exits 2
    now, before training or Ray; an unreachable one is left to the writer, which rides
    out outages (`metalearner.tracking.access.check_server_access`)."""
    from metalearner.tracking.access import TrackingAccessError, check_server_access

    try:
        check_server_access(uri, experiment)
    except TrackingAccessError as e:
        fail(str(e))


def build_run(cfg: Any) -> Any:
    """The `TrainingRun` of ``cfg``; what its task and model reject exits 2."""
    from metalearner.train import TrainingRun

    try:
        return TrainingRun(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))


def read_run_id(ckpt_dir: Path) -> str | None:
    """The MLflow run that an earlier ``--checkpoint-dir`` run logged to, if it logged."""
    id_file = ckpt_dir / RUN_ID_FILE
    return id_file.read_text().strip() if id_file.is_file() else None


def open_sinks(args: argparse.Namespace, cfg: Any, task: Any, ckpt_dir: Path | None,
               resume_id: str | None) -> tuple[Any, Any, str]:
    """The trace sinks of ``metalearner train`` (both engines): MLflow unless --no-mlflow
    (a new run, or the resumed one), plus --trace-csv. Returns (sink, mlflow sink, uri)."""
    from metalearner.journal import JOURNAL_DIR
    from metalearner.trace import CsvSink, MultiSink
    from metalearner.tracking import KIND_TAG, MlflowSink, TrackingIncomplete, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    sinks: list[Any] = []
    mlflow_sink = None
    if not args.no_mlflow:
        name = args.run_name or f"{cfg.task.name}-{cfg.controller['name']}-seed{cfg.train.seed}"
        # the journal lives beside the checkpoints (so --resume continues it), else in a
        # temporary folder that is removed once everything is delivered
        try:
            mlflow_sink = MlflowSink.start(uri, args.experiment, name, tags={KIND_TAG: "train"},
                                           resume_run_id=resume_id,
                                           journal_dir=ckpt_dir / JOURNAL_DIR if ckpt_dir else None)
        except TrackingIncomplete as e:
            raise SystemExit(tracking_failed(e.pending, e.journal_dir, "the run could not be created")) from None
        sinks.append(mlflow_sink)
        if ckpt_dir:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / RUN_ID_FILE).write_text(mlflow_sink.run_id)
    if args.trace_csv:
        sinks.append(CsvSink(args.trace_csv, tuple(getattr(task, "eval_metric_names", ()))))
    return MultiSink(*sinks), mlflow_sink, uri


def run_traced(args: argparse.Namespace, cfg: Any, sink: Any, mlflow_sink: Any, uri: str,
               body: Any) -> int:
    """Run ``body()`` (returns a Summary), close the sinks with the run's status, print
    the one-screen summary."""
    from metalearner.tracking import DIVERGED_TAG, TrackingIncomplete

    status = "FAILED"
    left = None
    try:
        summary = body()
        status = "FAILED" if summary.diverged else "FINISHED"
        if summary.diverged and mlflow_sink:
            where = f"at step {summary.steps} of {cfg.train.steps}"
            mlflow_sink.writer.set_tags(mlflow_sink.key, {DIVERGED_TAG: where})
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            sink.close(status)
        except TrackingIncomplete as e:
            left = e
    print_summary(summary, cfg, uri if mlflow_sink else None, mlflow_sink.run_id if mlflow_sink else None,
                  args.experiment, args.trace_csv)
    if summary.diverged:
        print(f"metalearner: error: the run diverged: {cfg.train.max_nonfinite} non-finite steps in a row "
              f"(train.max_nonfinite) ended it at step {summary.steps} of {cfg.train.steps}; "
              f"{summary.nonfinite_steps} step(s) skipped in all", file=sys.stderr)
    if left is not None:
        return tracking_failed(left.pending, left.journal_dir, "the run's trace is incomplete in the store")
    if summary.diverged:
        return EXIT_FAILURE
    return 0


def tracking_failed(left: Any, journal_dir: Path, what: str) -> int:
    """Say what the journal still holds and how to deliver it; returns exit code 1."""
    from metalearner.journal import sync_target

    print(f"\nmetalearner: tracking incomplete: {what}: {left.points} trace point(s) pending "
          f"({left.records} record(s) in {left.runs} run(s))", file=sys.stderr)
    for err in left.errors:
        print(f"  tracking error: {err}", file=sys.stderr)
    print(f"  deliver them when the store is back: metalearner sync {sync_target(Path(journal_dir))}",
          file=sys.stderr)
    return EXIT_FAILURE


def print_summary(summary: Any, cfg: Any, uri: str | None, run_id: str | None,
                  experiment: str, trace_csv: str | None) -> None:
    from metalearner.tracking import ui_command

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        "",
        f"metalearner train — {cfg.task.name} task, controller {cfg.controller['name']}, seed {cfg.train.seed}",
        f"  steps            {summary.steps} in {summary.seconds:.1f} s ({summary.steps / max(summary.seconds, 1e-9):.1f} steps/s)",
        f"  final train loss {f(summary.final_loss)}",
        f"  final val loss   {f(summary.final_val_loss)}   (best {f(summary.best_val_loss)})",
    ]
    for k, v in summary.eval_metrics.items():
        lines.append(f"  {k:<16} {v:.4f}")
    lo, hi = summary.rope_base_range
    lines.append(f"  rope base        {lo:.6g} .. {hi:.6g}")
    lines.append(f"  window           {summary.window_range[0]} .. {summary.window_range[1]}")
    if run_id:
        lines.append(f"  MLflow run       {run_id} (experiment '{experiment}') in {uri}")
        lines.append(f"  view it with     {ui_command(uri)}")
    if trace_csv:
        lines.append(f"  trace CSV        {trace_csv}")
    print("\n".join(lines))


# ---------------------------------------------------------------- sweep / compare / data


def cmd_sweep(args: argparse.Namespace) -> int:
    from metalearner.environment import set_defaults
    from metalearner.tracking import resolve_tracking_uri, ui_command

    try:
        spec = sweep_inputs(args)  # every input checked: exit 2 before Ray or MLflow starts
    except ConfigError as e:
        fail(str(e))
    if args.resume:
        from metalearner.sweep_state import SweepState

        uri = args.tracking_uri or SweepState.load(args.resume).tracking_uri  # checked by sweep_inputs
    else:
        uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_access(uri, spec.name)  # before Ray starts
    set_defaults({"TUNE_DISABLE_SIGINT_HANDLER": "1"})  # Ctrl-C goes to our handler (below), not Tune's
    from trainables.sweep import SweepRunner

    def on_event(event: Any) -> None:  # the link, as soon as the parent run exists (before the first trial)
        if event.kind == "link":
            print(f"  open the review: {event.url}\n    (the UI: {ui_command(uri)})", flush=True)

    runner = SweepRunner(spec, uri, storage=args.storage, address=args.address, num_cpus=args.num_cpus,
                         progress=None,  # the face shows the trials: live on a terminal, plain lines elsewhere
                         resume=args.resume, metrics_db=args.metrics_db, on_event=on_event)
    resume = resume_command(runner.experiment_dir, args)
    print(f"metalearner sweep '{spec.name}'{' (smoke test)' if args.smoke_test else ''}"
          f"{' resumed' if args.resume else ''}: {len(spec.arms)} arm(s) x {len(spec.seeds)} seed(s); "
          f"MLflow: {uri}\n  folder: {runner.experiment_dir}", flush=True)
    from metalearner.journal import JournalError

    try:
        with stop_on_signals(runner.request_stop, resume):
            result = runner.run()
    except JournalError as e:  # e.g. a --resume while another process holds the sweep's journal
        fail(str(e))
    from metalearner.journal import JOURNAL_DIR, pending

    journal = runner.folder / JOURNAL_DIR
    left = pending(journal)  # the writer is closed: what it could not deliver is in the journal
    if result.interrupted:
        print(f"\nsweep interrupted after {result.seconds:.0f} s: parent run "
              f"{result.parent_run_id or '(not in the store yet)'} and its unfinished trials are KILLED "
              "(tag metalearner.interrupted); no later phase ran")
        if not left.complete:
            tracking_failed(left, journal, f"sweep '{spec.name}'")  # a resume delivers them too
        print(f"resume it with: {resume}", flush=True)
        return EXIT_INTERRUPTED
    print(f"\nsweep finished in {result.seconds:.0f} s; parent run {result.parent_run_id or '(not in the store yet)'}")
    for msg in result.errors:
        print(f"  trial error: {msg}")
    for arm, error in result.failed_arms.items():
        print(f"  arm '{arm}' failed: no trial completed, so it has no best (nothing exported, not confirmed); "
              "its first trial error:")
        print(textwrap.indent(error, "    "))
    if result.error_log is not None:
        print(f"  full errors (traceback and trial folder of each failed trial): {result.error_log}")
    if not left.complete:  # no report from a partial store; compare works after the sync
        tracking_failed(left, journal, f"sweep '{spec.name}'")
        print(f"  then the report: metalearner compare {spec.name} --tracking-uri {uri}", file=sys.stderr)
        return EXIT_FAILURE
    for arm, ctrl in result.best.items():
        settings = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in ctrl.items())
        print(f"  best '{arm}' controller: {settings}")
        print(f"    as a spec: {result.spec_files[arm]}  (metalearner train --controller-spec FILE)")
    from metalearner.report import write_report

    out = Path(args.out) if args.out else runner.folder / "report"
    report = write_report(uri, result.parent_run_id, out)
    if not args.out:
        from trainables.storage import publish

        publish(runner.folder, runner.storage, runner.folder.name)  # a URI storage gets the report too
    print("\n" + terminal_text(report))
    print(f"\nreport: {out}  (also logged to the parent run under report/)")
    print(f"view it: {ui_command(uri)}\n  then open {report.url}")
    return EXIT_FAILURE if result.errors or result.failed_arms else 0


def terminal_text(report: Any) -> str:
    """The report's text as printed: on a terminal, each arm in its colour (the UI's)."""
    from metalearner.report.render import paint_arms

    return paint_arms(report.text, report.colours) if sys.stdout.isatty() else report.text


def resume_command(experiment_dir: Path, args: argparse.Namespace) -> str:
    """The command that continues the sweep of ``experiment_dir``, with the flags of this
    one that a resume needs again (tracking store, Ray cluster, local Ray's CPUs)."""
    words = ["metalearner", "sweep", "--resume", str(experiment_dir)]
    for flag, value in (("--tracking-uri", args.tracking_uri), ("--address", args.address),
                        ("--num-cpus", args.num_cpus)):
        if value is not None:
            words += [flag, str(value)]
    if getattr(args, "metrics_db", None) and urlsplit(args.metrics_db).password is None and not os.environ.get("METALEARNER_METRICS_DB"):
        words += ["--metrics-db", args.metrics_db]  # a password is never printed: set $METALEARNER_METRICS_DB
    return shlex.join(words)


@contextmanager
def stop_on_signals(stop: Any, resume: str) -> Iterator[None]:
    """While the block runs, the first SIGINT or SIGTERM calls ``stop()`` (the sweep ends
    its phase, saves its state and returns); a second one exits at once with 130 (the
    journal is durable: ``resume`` delivers what was journaled). The handlers in force
    before are restored after.

    Args:
        stop: called (in the main thread) on the first signal.
        resume: the command that continues the sweep, printed on the second signal.
    """
    count = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            # os.write: a print here could re-enter one the main thread is in
            os.write(2, f"\n{name}: stopping the sweep and saving its state (again to exit at once)\n".encode())
            stop()
            return
        os.write(2, f"\n{name} again: exiting now; resume with: {resume}\n".encode())
        os._exit(EXIT_INTERRUPTED)

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def cmd_compare(args: argparse.Namespace) -> int:
    from metalearner.report import export_best_controller, load_traces, write_report
    from metalearner.tracking import TrackingIncomplete, resolve_tracking_uri, ui_command

    try:
        compare_inputs(args)
    except ConfigError as e:
        fail(str(e))
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        report = write_report(uri, args.sweep, Path(args.out), log_to_mlflow=not args.no_log)
    except ValueError as e:
        fail(str(e))
    except TrackingIncomplete as e:  # the report is on disk; its writes to the store wait in the journal
        return tracking_failed(e.pending, e.journal_dir, f"the report in {args.out} could not be logged to the store")
    print(terminal_text(report))
    print(f"\nreport: {args.out}  (parent run {report.parent_run_id})")
    if args.export_best:
        runs, traces = load_traces(uri, report.parent_run_id)
        try:
            spec = export_best_controller(runs, traces, args.export_best, arm=args.arm)
        except ValueError as e:
            fail(str(e))
        print(f"best controller {spec} -> {args.export_best}")
    print(f"view it: {ui_command(uri)}\n  then open {report.url}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """``metalearner sync EXPERIMENT_DIR``: deliver the journaled writes an outage left."""
    from metalearner.journal import JournalError, find_journal
    from metalearner.tracking import sync_journal

    if not args.outage_s >= 0:
        fail(f"--outage-s: got {args.outage_s}, expected a number of seconds >= 0")
    journal = find_journal(args.experiment_dir)
    if journal is None:
        fail(f"EXPERIMENT_DIR: got {args.experiment_dir!r}, expected a sweep's experiment folder "
             "(or a --checkpoint-dir) holding tracking/journal.jsonl")
    try:
        left, written = sync_journal(journal, args.tracking_uri, outage_s=args.outage_s)
    except JournalError as e:
        fail(str(e))
    if not left.complete:
        return tracking_failed(left, journal, "sync")
    print(f"metalearner sync: {written} trace point(s) delivered; the journal in {journal} is fully in the store")
    return 0


def cmd_data_speech(args: argparse.Namespace) -> int:
    try:
        data_inputs(args)
    except ConfigError as e:
        fail(str(e))
    from metalearner.tasks.speech_data import generate_speech_digits

    try:
        out = generate_speech_digits(args.out, args.n, seed=args.seed)
    except (RuntimeError, ValueError, FileExistsError) as e:
        fail(str(e))
    print(f"wrote {args.n} utterances to {out} (audiofolder layout: metadata.csv + WAV files)")
    print(f"train on it: metalearner train --task speech --set task.data_dir={out} --controller ewma")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="metalearner",
        description="Meta-learn online controllers of a transformer's RoPE base and attention window.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="one controlled training run, traced in MLflow",
                       description="Train one model with an online controller; every step is traced in MLflow.")
    t.add_argument("--task", help="recall | text | speech (default: text)")
    t.add_argument("--controller", help="static | schedule | ewma | plateau, or a plugin: module:Class or an "
                   "entry point of the group metalearner.controllers (default: ewma)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: train.steps = 300)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field with a dotted key, e.g. controller.factor=1.01 (repeatable)")
    t.add_argument("--config", help="YAML file with task/model/train/controller sections; --controller-spec, "
                   "--steps, --engine and --set override its values (--task/--controller must agree with it)")
    t.add_argument("--controller-spec", help="YAML controller spec (e.g. exported by 'metalearner compare')")
    t.add_argument("--engine", choices=["torch", "hf"], default=None,
                   help="training engine: our PyTorch loop (default) or the Hugging Face Trainer")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    t.add_argument("--experiment", default="metalearner-train", help="MLflow experiment name")
    t.add_argument("--run-name", help="MLflow run name (default: TASK-CONTROLLER-seedN)")
    t.add_argument("--trace-csv", help="also write the per-step trace to this CSV file")
    t.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (use with --trace-csv)")
    t.add_argument("--checkpoint-dir", help="write checkpoints here every train.checkpoint_every steps and at the end")
    t.add_argument("--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir")
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="meta-learn controllers: a Ray Tune sweep traced in MLflow",
                        description="Run an experiment spec (experiments/*.yaml) on Ray Tune; every trial is a "
                                    "child MLflow run of the sweep's parent run; prints the policy comparison.")
    sw.add_argument("experiment", nargs="?", help="experiment spec, e.g. experiments/quickstart.yaml")
    sw.add_argument("--resume", metavar="EXPERIMENT_DIR",
                    help="continue the stopped sweep of this folder (the one a sweep prints); a spec, --set or "
                         "--smoke-test given too must not change it")
    sw.add_argument("--smoke-test", action="store_true", help="apply the spec's smoke block (few steps and trials)")
    sw.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    sw.add_argument("--storage", help="Ray Tune storage for checkpoints: a local folder or a URI (s3://, gs://, "
                    "file://) that goes to Ray unchanged (default: ./ray_results)")
    sw.add_argument("--address", help="address of a running Ray cluster (default: start a local Ray)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a spec field with a dotted key, e.g. train.steps=200 (repeatable)")
    sw.add_argument("--arm", action="append", default=None, metavar="NAME=FILE",
                    help="add a fixed arm NAME whose controller is read from FILE, a controller exported by another "
                         "sweep ('metalearner compare --export-best FILE' or its best_ARM.yaml), as a spec's "
                         "arms[i].controller_file (repeatable)")
    sw.add_argument("--out", help="folder for the comparison report (default: STORAGE/NAME-TIMESTAMP/report; for a URI "
                    "storage written to ./sweeps/NAME-TIMESTAMP/report and copied to the URI)")
    sw.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: Ray's own count)")
    sw.add_argument("--py-modules", action="append", default=None, metavar="PATH",
                    help="a package folder, .py module or .whl file every Ray worker must import (a controller "
                         "plugin): added to the spec's runtime_env.py_modules (repeatable; kept by --resume)")
    sw.add_argument("--working-dir", metavar="DIR",
                    help="a folder Ray ships to every worker as its code root (runtime_env.working_dir; "
                         "replaces the spec's; kept by --resume)")
    sw.add_argument("--metrics-db", default=os.environ.get("METALEARNER_METRICS_DB") or None, metavar="URI",
                    help="the tracking server's PostgreSQL backend (postgresql://USER@HOST:PORT/DB): trace points "
                         "are written there in bulk, everything else through the server; for sweeps that log faster "
                         "than the server can take (default: $METALEARNER_METRICS_DB, else all through the server)")
    sw.set_defaults(func=cmd_sweep)

    cp = sub.add_parser("compare", help="compare the policies of a sweep: table, plots, paired tests",
                        description="Compare the arms of a sweep (by experiment name: its latest sweep; or by "
                                    "parent run id). Writes a table and plots and logs them to the parent run.")
    cp.add_argument("sweep", metavar="NAME-or-run-id")
    cp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    cp.add_argument("--out", default="report", help="output folder (default: ./report)")
    cp.add_argument("--export-best", metavar="FILE",
                    help="write the best configuration as a controller spec for 'metalearner train --controller-spec'")
    cp.add_argument("--arm", help="with --export-best: take the best search trial of this arm")
    cp.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    cp.set_defaults(func=cmd_compare)

    sy = sub.add_parser("sync", help="deliver the trace points an MLflow outage left in a sweep's journal",
                        description="Deliver what a sweep (or a train --checkpoint-dir) journaled but could not "
                                    "write to MLflow: creates missing runs, sends params, tags and every missing "
                                    "point exactly once, terminates runs with their status.")
    sy.add_argument("experiment_dir", metavar="EXPERIMENT_DIR",
                    help="the experiment folder the sweep printed (holds tracking/journal.jsonl)")
    sy.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the journal was written for)")
    sy.add_argument("--outage-s", type=float, default=60.0,
                    help="how long to retry an unreachable store before giving up (default: 60)")
    sy.set_defaults(func=cmd_sync)

    da = sub.add_parser("data", help="make local data sets", description="Make local data sets.")
    dsub = da.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    sd = dsub.add_parser("speech-digits", help="synthesize a spoken-digits corpus with espeak-ng (audiofolder layout)")
    sd.add_argument("--out", required=True, help="output folder (WAV files + metadata.csv)")
    sd.add_argument("--n", type=int, default=2000, help="number of utterances (default: 2000)")
    sd.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sd.set_defaults(func=cmd_data_speech)
    return p


def main(argv: list[str] | None = None) -> int:
    from metalearner.environment import HF_OFFLINE, MLFLOW_HTTP, set_defaults

    set_defaults(HF_OFFLINE, MLFLOW_HTTP)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ConfigError as e:
        fail(str(e))
    return args.func(args) or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
