"""Malformed inputs through the real command line: exit 2, one line naming the field, nothing started.

Each case runs `metalearner.cli.main` in-process (a subprocess per case would import torch
60 times); `test_cases_through_a_real_subprocess` runs a handful through
``python -m metalearner.cli`` to show that the one line is all a user sees. Every case
also asserts that nothing was written into the working folder (no ``mlflow.db``, no
``ray_results``) and that Ray was not started. Baselines (`test_baselines_are_valid`)
prove that each case fails because of its own defect, not because of its surroundings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metalearner.cli import build_parser, main
from metalearner.inputs import sweep_inputs, train_inputs

SPEC = {
    "name": "probe",
    "task": {"name": "recall", "n_pairs": 4, "distance": 16},
    "model": {"preset": "tiny"},
    "train": {"steps": 20, "seq_len": 32, "report_every": 10, "eval_every": 10},
    "seeds": [0],
    "arms": [{"name": "static", "controller": {"name": "static"}},
             {"name": "ewma", "controller": {"name": "ewma"},
              "search": {"space": {"controller.factor": {"uniform": [1.01, 1.1]}}, "num_samples": 2}}],
}
STATE = json.dumps({"version": 1, "tracking_uri": "sqlite:///m.db", "stamp": "s", "storage": "ray",
                    "phases": {}, "children": {}})  # a sweep's state file (metalearner.sweep_state)
TRAIN = ["train", "--task", "recall", "--steps", "5", "--set", "model.preset=tiny", "--set", "train.seq_len=64"]


def spec_with(**changes):
    data = yaml.safe_load(yaml.safe_dump(SPEC))
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    return data


def pbt(space, scheduler="pbt", searcher="random"):
    return spec_with(arms=[{"name": "t", "controller": {"name": "ewma"},
                            "search": {"space": space, "scheduler": {"name": scheduler}, "searcher": searcher}}])


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))
    return path


def sweep(spec="spec.yaml", *extra):
    return ["sweep", spec, "--num-cpus", "2", *extra]


# (id, files to write into the working folder, argv, field the line must name)
CASES = [
    # ---- specs: the cases
    ("spec-train-int", {"spec.yaml": "name: probe\ntrain: 5\n"}, sweep(), "train"),
    ("spec-arm-path-name", {"spec.yaml": spec_with(arms=[{"name": "../../evil", "controller": {"name": "static"}}])},
     sweep(), "arms[0].name"),
    ("spec-nan-weight-decay", {"spec.yaml": "name: probe\ntrain: {weight_decay: .nan}\n"}, sweep(),
     "train.weight_decay"),
    ("spec-not-utf8", {"spec.yaml": b"name: probe\ndescription: caf\xe9\n"}, sweep(), "experiment"),
    ("spec-seed-string", {"spec.yaml": spec_with(seed="x")}, sweep(), "seed"),
    ("spec-space-list", {"spec.yaml": spec_with(arms__1__search__space=[1, 2])}, sweep(), "arms[1].search.space"),
    ("spec-metric-unknown", {"spec.yaml": spec_with(metric="accuracy")}, sweep(), "metric"),
    ("spec-mode-wrong-way", {"spec.yaml": spec_with(mode="max")}, sweep(), "mode"),
    ("spec-target-loss-negative", {"spec.yaml": spec_with(target_loss=-1.0)}, sweep(), "target_loss"),
    ("spec-target-loss-string", {"spec.yaml": spec_with(target_loss="low")}, sweep(), "target_loss"),
    ("spec-mode-unknown", {"spec.yaml": spec_with(mode="sideways")}, sweep(), "mode"),
    ("spec-pbt-beta-reaches-1", {"spec.yaml": pbt({"controller.beta": {"uniform": [0.5, 1.0]}})}, sweep(),
     "arms[0].search.space.controller.beta"),
    ("spec-factor-reaches-1", {"spec.yaml": pbt({"controller.factor": {"loguniform": [1.0, 1.1]}})}, sweep(),
     "arms[0].search.space.controller.factor"),
    ("spec-hyperopt-missing", {"spec.yaml": pbt({"controller.factor": {"uniform": [1.01, 1.1]}}, "fifo", "hyperopt")},
     sweep(), "search.searcher"),
    ("spec-pb2-missing-sklearn", {"spec.yaml": pbt({"controller.factor": {"uniform": [1.01, 1.1]}}, "pb2")},
     sweep(), "search.scheduler.name"),
    # ---- specs: settings the run would not honour
    ("spec-train-seed-overwritten", {"spec.yaml": spec_with(train__seed=3)}, sweep(), "train.seed"),
    ("spec-checkpoint-not-multiple", {"spec.yaml": spec_with(train__checkpoint_every=15)}, sweep(),
     "train.checkpoint_every"),
    ("spec-task-dictates-vocab", {"spec.yaml": spec_with(model__vocab_size=100)}, sweep(), "model.vocab_size"),
    ("spec-speech-seq-len", {"spec.yaml": spec_with(task={"name": "speech", "data_dir": "nowhere"})}, sweep(),
     "train.seq_len"),
    ("spec-min-window-lowered", {"spec.yaml": spec_with(arms=[{"name": "e", "controller": {"name": "ewma",
                                                                                          "min_window": 64}}])},
     sweep(), "arms[0].controller.min_window"),
    # ---- specs: sizes, numbers, shapes
    ("spec-batch-too-big", {"spec.yaml": spec_with(train__batch_size=4096, train__seq_len=4096)}, sweep(),
     "train.batch_size"),
    ("spec-model-too-big", {"spec.yaml": spec_with(model__d_model=8192, model__n_layers=128)}, sweep(),
     "model.d_model"),
    ("spec-steps-bool", {"spec.yaml": spec_with(train__steps=True)}, sweep(), "train.steps"),
    ("spec-seeds-duplicate", {"spec.yaml": spec_with(seeds=[1, 1])}, sweep(), "seeds"),
    ("spec-seeds-empty", {"spec.yaml": spec_with(seeds=[])}, sweep(), "seeds"),
    ("spec-unknown-key", {"spec.yaml": spec_with(colour="red")}, sweep(), "colour"),
    ("spec-infinite-budget", {"spec.yaml": "name: probe\nstop: {time_budget_s: .inf}\n"}, sweep(),
     "stop.time_budget_s"),
    ("spec-cpus-per-trial", {"spec.yaml": spec_with(resources={"cpus_per_trial": 3})}, sweep(),
     "resources.cpus_per_trial"),
    ("spec-gpu-unused", {"spec.yaml": spec_with(resources={"gpus_per_trial": 0.5})}, sweep(), "train.device"),
    ("spec-cuda-without-gpu", {"spec.yaml": spec_with(train__device="cuda")}, sweep(), "resources.gpus_per_trial"),
    ("spec-bad-yaml", {"spec.yaml": "name: [probe\n"}, sweep(), "experiment"),
    ("spec-missing", {}, sweep(), "experiment"),
    ("spec-a-list", {"spec.yaml": "- 1\n- 2\n"}, sweep(), "experiment"),
    ("spec-choice-of-mapping", {"spec.yaml": pbt({"controller.factor": {"choice": [{"a": 1}]}}, "fifo")}, sweep(),
     "arms[0].search.space.controller.factor.choice[0]"),
    ("spec-impossible-date", {"spec.yaml": "name: probe\ndescription: 2024-02-30\n"}, sweep(), "experiment"),
    ("spec-name-with-slash", {"spec.yaml": spec_with(name="a/b")}, sweep(), "name"),
    # ---- --set on a sweep
    ("set-steps-zero", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "train.steps=0"), "train.steps"),
    ("set-arm-not-mapping", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "arms[0]=1"), "arms[0]"),
    ("set-arm-index-out-of-range", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "arms[9].name=x"), "arms[9]"),
    ("set-no-equals", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "train.steps"), "--set"),
    ("set-inside-a-number", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "train.steps.x=1"), "train.steps"),
    ("set-bad-key", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "train..steps=1"), "--set"),
    # ---- sweep flags
    ("flag-num-cpus-zero", {"spec.yaml": SPEC}, ["sweep", "spec.yaml", "--num-cpus", "0"], "--num-cpus"),
    ("flag-num-cpus-text", {"spec.yaml": SPEC}, ["sweep", "spec.yaml", "--num-cpus", "two"], "--num-cpus"),
    ("flag-storage-unwritable", {"spec.yaml": SPEC, "afile": "x"}, sweep("spec.yaml", "--storage", "afile/ray"),
     "--storage"),
    ("flag-storage-file-uri-unwritable", {"spec.yaml": SPEC, "afile": "x"},
     sweep("spec.yaml", "--storage", "file://afile/ray"), "--storage"),
    ("flag-storage-proc", {"spec.yaml": SPEC}, sweep("spec.yaml", "--storage", "/proc/metalearner-nope"),
     "--storage: got '/proc/metalearner-nope', expected a place this user may write"),
    ("flag-storage-proc-file-uri", {"spec.yaml": SPEC},
     sweep("spec.yaml", "--storage", "file:///proc/metalearner-nope/ray"), "--storage: got 'file:///proc/"),
    ("flag-storage-sys", {"spec.yaml": SPEC}, sweep("spec.yaml", "--storage", "/sys/metalearner-nope"),
     "--storage: got '/sys/metalearner-nope'"),
    ("flag-tracking-unwritable", {"spec.yaml": SPEC, "afile": "x"},
     sweep("spec.yaml", "--tracking-uri", "sqlite:///afile/m.db"), "--tracking-uri"),
    ("flag-out-is-a-file", {"spec.yaml": SPEC, "afile": "x"}, sweep("spec.yaml", "--out", "afile"), "--out"),
    ("flag-unknown", {"spec.yaml": SPEC}, sweep("spec.yaml", "--bogus"), "--bogus"),
    ("flag-metrics-db-not-postgresql", {"spec.yaml": SPEC},
     sweep("spec.yaml", "--tracking-uri", "http://127.0.0.1:9", "--metrics-db", "mysql://u@127.0.0.1/mlflow"),
     "--metrics-db"),
    ("flag-metrics-db-unreachable", {"spec.yaml": SPEC},
     sweep("spec.yaml", "--tracking-uri", "http://127.0.0.1:9", "--metrics-db", "postgresql://u@127.0.0.1:9/mlflow"),
     "--metrics-db"),
    ("spec-max-failures-negative", {"spec.yaml": spec_with(resources={"max_failures": -1})}, sweep(),
     "resources.max_failures"),
    ("spec-max-failures-float", {"spec.yaml": spec_with(resources={"max_failures": 1.5})}, sweep(),
     "resources.max_failures"),
    # ---- sweep --resume
    ("resume-no-spec-no-resume", {}, ["sweep"], "experiment"),
    ("resume-not-a-sweep-folder", {"d/keep": "x"}, ["sweep", "--resume", "d"], "--resume"),
    ("resume-missing-folder", {}, ["sweep", "--resume", "nowhere"], "--resume"),
    ("resume-corrupt-state", {"d/sweep_state.json": "{not json", "d/experiment.yaml": SPEC},
     ["sweep", "--resume", "d"], "--resume"),
    ("resume-old-state", {"d/sweep_state.json": '{"version": 0}', "d/experiment.yaml": SPEC},
     ["sweep", "--resume", "d"], "--resume"),
    ("resume-changed-spec", {"d/sweep_state.json": STATE, "d/experiment.yaml": SPEC,
                             "spec.yaml": spec_with(train__steps=30)},
     ["sweep", "spec.yaml", "--resume", "d"], "train.steps: got 30, expected 20"),
    ("resume-changed-by-set", {"d/sweep_state.json": STATE, "d/experiment.yaml": SPEC},
     ["sweep", "--resume", "d", "--set", "arms[1].search.num_samples=3"], "arms[1].search.num_samples: got 3"),
    ("resume-with-storage", {"d/sweep_state.json": STATE, "d/experiment.yaml": SPEC},
     ["sweep", "--resume", "d", "--storage", "elsewhere"], "--storage: got 'elsewhere' with --resume, expected 'ray'"),
    ("resume-other-tracking-store", {"d/sweep_state.json": STATE, "d/experiment.yaml": SPEC},
     ["sweep", "--resume", "d", "--tracking-uri", "sqlite:///other.db"], "--tracking-uri: got 'sqlite:///other.db'"),
    # ---- train: flags, --config, --controller-spec, --set, files
    ("train-steps-zero", {}, ["train", "--steps", "0"], "--steps"),
    ("train-steps-text", {}, ["train", "--steps", "x"], "--steps"),
    ("train-engine-unknown", {}, [*TRAIN, "--engine", "tpu"], "--engine"),
    ("config-task-null", {"c.yaml": "task: null\n"}, [*TRAIN, "--config", "c.yaml"], "task"),
    ("config-not-utf8", {"c.yaml": b"train: {steps: 5}\n# \xff\n"}, [*TRAIN, "--config", "c.yaml"], "--config"),
    ("config-a-list", {"c.yaml": "- train\n"}, [*TRAIN, "--config", "c.yaml"], "--config"),
    ("config-task-conflicts-flag", {"c.yaml": {"task": {"name": "text"}}}, [*TRAIN, "--config", "c.yaml"], "--task"),
    ("config-controller-conflicts-flag", {"c.yaml": {"controller": {"name": "static"}}},
     [*TRAIN, "--controller", "ewma", "--config", "c.yaml"], "--controller"),
    ("spec-file-conflicts-flag", {"s.yaml": {"controller": {"name": "ewma"}}},
     [*TRAIN, "--controller", "static", "--controller-spec", "s.yaml"], "--controller"),
    ("spec-file-and-config-controller", {"s.yaml": {"name": "ewma"}, "c.yaml": {"controller": {"factor": 1.1}}},
     [*TRAIN, "--config", "c.yaml", "--controller-spec", "s.yaml"], "--controller-spec"),
    ("spec-file-bad-yaml", {"s.yaml": "controller: {name: ewma\n"}, [*TRAIN, "--controller-spec", "s.yaml"],
     "--controller-spec"),
    ("spec-file-beta-nan", {"s.yaml": "controller: {name: ewma, beta: .nan}\n"},
     [*TRAIN, "--controller-spec", "s.yaml"], "controller.beta"),
    ("set-beta-nan", {}, [*TRAIN, "--set", "controller.beta=.nan"], "controller.beta"),
    ("set-seed-text", {}, [*TRAIN, "--set", "train.seed=x"], "train.seed"),
    ("set-distance-too-short", {}, [*TRAIN, "--set", "task.distance=4"], "task.distance"),
    ("train-resume-without-dir", {}, [*TRAIN, "--resume"], "--resume"),
    ("train-resume-empty-dir", {"ck/keep": "x"}, [*TRAIN, "--resume", "--checkpoint-dir", "ck"], "--checkpoint-dir"),
    ("train-resume-corrupt", {"ck/checkpoint.pt": b"\x80\x02not a checkpoint"},
     [*TRAIN, "--resume", "--checkpoint-dir", "ck"], "--checkpoint-dir"),
    ("train-trace-csv-unwritable", {"afile": "x"}, [*TRAIN, "--trace-csv", "afile/t.csv"], "--trace-csv"),
    ("train-no-mlflow-no-trace", {}, [*TRAIN, "--no-mlflow"], "--no-mlflow"),
    ("train-experiment-name", {}, [*TRAIN, "--experiment", "../x"], "--experiment"),
    ("spec-outage-negative", {"spec.yaml": spec_with(tracking={"outage_s": -5})}, sweep(), "tracking.outage_s"),
    ("spec-outage-text", {"spec.yaml": spec_with(tracking={"outage_s": "5m"})}, sweep(), "tracking.outage_s"),
    ("spec-tracking-unknown-key", {"spec.yaml": spec_with(tracking={"retries": 3})}, sweep(), "tracking.retries"),
    ("set-outage-nan", {"spec.yaml": SPEC}, sweep("spec.yaml", "--set", "tracking.outage_s=.nan"),
     "tracking.outage_s"),
    # ---- sync
    ("sync-no-journal", {"exp/keep": "x"}, ["sync", "exp"], "EXPERIMENT_DIR"),
    ("sync-missing-dir", {}, ["sync", "nowhere"], "EXPERIMENT_DIR"),
    ("sync-outage-negative", {"exp/tracking/journal.jsonl": "{}\n"}, ["sync", "exp", "--outage-s", "-1"],
     "--outage-s"),
    # ---- data and compare
    ("data-n-zero", {}, ["data", "speech-digits", "--out", "d", "--n", "0"], "--n"),
    ("compare-arm-without-export", {}, ["compare", "probe", "--arm", "ewma"], "--arm"),
    ("compare-name-with-slash", {}, ["compare", "../probe"], "NAME-or-run-id"),
]


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("hyperopt", "sklearn"):  # the probes must find these missing (installed or not)
        monkeypatch.setitem(sys.modules, name, None)
    return tmp_path


@pytest.mark.parametrize("files,argv,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_field(workdir, capsys, files, argv, field):
    for name, content in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        write(workdir / name, content)
    before = _listing(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metalearner: error: "), lines[0]
    assert field in lines[0], lines[0]
    assert out == ""
    assert _listing(workdir) == before  # no mlflow.db, no ray_results, no checkpoint folder
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_there_are_at_least_40_cases_across_every_kind_of_input():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 40
    assert {"spec", "set", "flag", "train", "config", "data", "compare", "sync"} <= kinds


def _args(argv):
    return build_parser().parse_args(argv)


def test_baselines_are_valid(workdir):
    """The surroundings of every case are valid: only the case's own defect fails it."""
    write(workdir / "spec.yaml", SPEC)
    spec = sweep_inputs(_args(sweep()))
    assert [a.name for a in spec.arms] == ["static", "ewma"]
    (workdir / "d").mkdir()  # the resume cases' folder, valid as they write it
    write(workdir / "d" / "experiment.yaml", SPEC)
    write(workdir / "d" / "sweep_state.json", STATE)
    assert sweep_inputs(_args(["sweep", "--resume", "d"])).raw == spec.raw
    assert sweep_inputs(_args(["sweep", "spec.yaml", "--resume", "d"])).raw == spec.raw
    cfg = train_inputs(_args(TRAIN))
    assert cfg.task.name == "recall" and cfg.train.steps == 5
    write(workdir / "c.yaml", {"task": {"name": "recall"}, "controller": {"factor": 1.1}})
    cfg = train_inputs(_args([*TRAIN, "--controller", "ewma", "--config", "c.yaml"]))
    assert cfg.controller == {"name": "ewma", "factor": 1.1}  # the flag's name, the file's settings
    write(workdir / "s.yaml", {"controller": {"name": "static"}})
    cfg = train_inputs(_args([*TRAIN, "--controller", "static", "--controller-spec", "s.yaml"]))
    assert cfg.controller == {"name": "static"}
    assert _listing(workdir) == {"spec.yaml", "c.yaml", "s.yaml", "d", "d/experiment.yaml", "d/sweep_state.json"}


def test_a_checkpoint_of_another_model_is_refused_before_anything_starts(workdir, capsys):
    from metalearner.config import load_run_config
    from metalearner.train import TrainingRun

    other = load_run_config({"task": {"name": "recall"}, "model": {"preset": "tiny", "d_model": 64},
                             "train": {"seq_len": 64, "steps": 5}})
    run = TrainingRun(other)
    run.advance(4)
    run.save(workdir / "ck")
    before = _listing(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN, "--steps", "10", "--resume", "--checkpoint-dir", "ck"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "model.d_model" in err[0], err
    assert _listing(workdir) == before
    # the same model, but no steps left to train (the checkpoint is at step 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "recall", "--steps", "3", "--set", "model.preset=tiny", "--set", "model.d_model=64",
              "--set", "train.seq_len=64", "--resume", "--checkpoint-dir", "ck"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "train.steps" in err, err


SUBPROCESS_CASES = ["spec-train-int", "spec-arm-path-name", "config-task-null", "train-resume-corrupt",
                    "flag-storage-unwritable", "flag-storage-proc", "train-steps-text"]


def test_cases_through_a_real_subprocess(cli, tmp_path):
    """What a user sees from the installed command: one line on stderr, exit 2, nothing written."""
    by_id = {c[0]: c for c in CASES}
    for case_id in SUBPROCESS_CASES:
        _, files, argv, field = by_id[case_id]
        work = tmp_path / case_id
        work.mkdir()
        for name, content in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            write(work / name, content)
        before = _listing(work)
        res = cli(*argv, cwd=work)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (case_id, res.stderr[-2000:])
        assert len(lines) == 1 and field in lines[0], (case_id, res.stderr[-2000:])
        assert _listing(work) == before, case_id


def test_parser_namespace_defaults_leave_task_and_controller_unset():
    """--task/--controller default to None so that a --config can be told apart from a flag."""
    args = _args(["train"])
    assert isinstance(args, argparse.Namespace) and args.task is None and args.controller is None


def test_resume_accepts_the_same_store_and_prints_every_flag_it_needs(workdir):
    from metalearner.cli import resume_command

    (workdir / "d").mkdir()
    write(workdir / "d" / "experiment.yaml", SPEC)
    write(workdir / "d" / "sweep_state.json", STATE)
    for uri in ("sqlite:///m.db", f"sqlite:///{workdir / 'm.db'}"):  # the state's store, by either path
        assert sweep_inputs(_args(["sweep", "--resume", "d", "--tracking-uri", uri])).name == "probe"
    for storage in ("ray", "ray/", str(workdir / "ray"), "file://ray", f"file://{workdir}/ray/"):  # the state's
        assert sweep_inputs(_args(["sweep", "--resume", "d", "--storage", storage])).name == "probe"
    args = _args(["sweep", "spec.yaml", "--tracking-uri", "sqlite:///m.db", "--address", "ray://head:10001",
                  "--num-cpus", "4"])
    assert resume_command(Path("sweeps/a b"), args) == ("metalearner sweep --resume 'sweeps/a b' --tracking-uri "
                                                        "sqlite:///m.db --address ray://head:10001 --num-cpus 4")
    assert resume_command(Path("d"), _args(["sweep", "spec.yaml"])) == "metalearner sweep --resume d"


def test_resume_while_the_journal_is_held_exits_2_with_one_line(workdir, capsys, monkeypatch):
    """A second ``--resume`` of a sweep still running (its journal locked): one line, no traceback."""
    from metalearner.journal import JOURNAL_DIR, Journal

    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")  # the CLI sets it; restored after the test
    (workdir / "d").mkdir()
    write(workdir / "d" / "experiment.yaml", SPEC)
    write(workdir / "d" / "sweep_state.json", STATE)
    held = Journal(workdir / "d" / JOURNAL_DIR, "sqlite:///m.db")  # the running sweep's
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "--resume", "d"])
    finally:
        held.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "in use by another process" in err[0], err
    assert not (workdir / "m.db").exists()  # the store is not touched
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_resume_takes_the_uri_storage_it_started_with_and_refuses_another(workdir, capsys):
    (workdir / "d").mkdir()
    write(workdir / "d" / "experiment.yaml", SPEC)
    write(workdir / "d" / "sweep_state.json", STATE.replace('"storage": "ray"', '"storage": "s3://b/ray?region=x"'))
    for storage in ("s3://b/ray?region=x", "s3://b/ray/?region=x"):
        assert sweep_inputs(_args(["sweep", "--resume", "d", "--storage", storage])).name == "probe"
    for storage in ("s3://b/other?region=x", "s3://b/ray", str(workdir / "ray")):
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "--resume", "d", "--storage", storage])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert f"--storage: got {storage!r} with --resume, expected 's3://b/ray?region=x'" in err[0], err


@pytest.fixture
def read_only_folder(workdir):
    """A folder this user cannot write into: mode 0555, and for root (who ignores modes, as
    CI runs) the immutable attribute too (`chattr +i`, removed at the end)."""
    folder = workdir / "ro"
    folder.mkdir(mode=0o555)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root writes into any folder, and chattr +i (the immutable attribute) is not available here")
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_storage_folder_exits_2(workdir, read_only_folder, capsys):
    write(workdir / "spec.yaml", SPEC)
    with pytest.raises(SystemExit) as exit_info:
        main(sweep("spec.yaml", "--storage", "ro/ray"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--storage: got 'ro/ray'" in err[0], err
