"""The `metalearner` command line, run for real in a subprocess."""

import csv
import re

import mlflow
import pytest
from _view import assert_view_finds_runs, parent_of

from metalearner.trace import STEP_KEYS as TRACE_KEYS  # noqa: E402 - the one definition


def only_run(uri, experiment="metalearner-train"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_train_traces_every_step_once_in_mlflow(cli, sqlite_uri, tmp_path):
    res = cli("train", "--task", "recall", "--controller", "ewma", "--steps", 30, "--tracking-uri", sqlite_uri,
              "--set", "model.preset=tiny", "--set", "train.seq_len=64", "--set", "train.eval_every=10",
              "--set", "controller.factor=1.05", "--trace-csv", tmp_path / "trace.csv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "final val loss" in res.stdout and "mlflow ui --backend-store-uri" in res.stdout
    client, run = only_run(sqlite_uri)
    assert run.info.status == "FINISHED"
    for key in TRACE_KEYS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, 31)), key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [10, 20, 30]
    p = run.data.params
    assert p["controller.name"] == "ewma" and float(p["controller.factor"]) == 1.05
    assert float(p["controller.beta"]) == 0.9 and float(p["controller.threshold"]) == 0.01
    assert int(p["controller.max_window"]) == 64 and p["model.preset"] == "tiny" and p["task.name"] == "recall"
    assert p["train.seed"] == "0"
    rows = list(csv.DictReader(open(tmp_path / "trace.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "window")}
    assert all(float(r["window"]) == hist[int(r["step"])] for r in rows)


def test_resume_continues_the_same_run_without_duplicates(cli, sqlite_uri, tmp_path):
    common = ["train", "--task", "recall", "--tracking-uri", sqlite_uri, "--set", "model.preset=tiny",
              "--set", "train.seq_len=64", "--set", "train.checkpoint_every=10", "--checkpoint-dir", tmp_path / "ck"]
    res = cli(*common, "--steps", 20, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = cli(*common, "--steps", 30, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    client, run = only_run(sqlite_uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 31))


@pytest.mark.parametrize("args,field", [
    (["--set", "train.steps=-1"], "train.steps"),
    (["--set", "model.colour=red"], "model.colour"),
    (["--controller", "pid"], "controller.name"),
    (["--set", "controller.beta=1.5"], "controller.beta"),
    (["--set", "task.files=/no/such/file.txt"], "task.files"),
    (["--controller-spec", "/no/such/spec.yaml"], "--controller-spec"),
    (["--task", "speech"], "task.data_dir"),
])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, field):
    res = cli("train", "--steps", 5, "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], res.stderr
    assert not (tmp_path / "m.db").exists()  # nothing started


def test_controller_spec_file_is_accepted(cli, tmp_path, sqlite_uri):
    spec = tmp_path / "best.yaml"
    spec.write_text("controller: {name: ewma, factor: 1.02, beta: 0.8, threshold: 0.001}\n")
    res = cli("train", "--task", "recall", "--steps", 4, "--controller-spec", spec, "--tracking-uri", sqlite_uri,
              "--set", "model.preset=tiny", "--set", "train.seq_len=64", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _, run = only_run(sqlite_uri)
    assert float(run.data.params["controller.factor"]) == 1.02 and float(run.data.params["controller.beta"]) == 0.8


# The options DESIGN.md's CLI contract names, per command (each command may have more).
CONTRACT = {
    "train": {"--task", "--controller", "--steps", "--set", "--tracking-uri", "--trace-csv"},
    "sweep": {"--smoke-test", "--tracking-uri", "--storage", "--address", "--set", "--resume"},
    "compare": {"--tracking-uri", "--out"},
    "sync": {"--tracking-uri"},
    "data speech-digits": {"--out", "--n", "--seed"},
}


def help_entries(text, section):
    """{first word of an entry: its help text} of one section of argparse's help output
    (``options:`` or ``positional arguments:``); an entry's help may start on its own line,
    deeper indented, and run over several lines."""
    entries, name = {}, None
    lines = text.split(section + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
    for line in lines:
        if len(line) - len(line.lstrip()) in (2, 4):  # an entry (4: a command under COMMAND)
            words = line.strip().split("  ", 1)  # the name (and metavar) ends where two spaces start
            name = words[0].split(", ")[-1].split()[0]  # "-h, --help" -> "--help"
            entries[name] = words[1].strip() if len(words) > 1 else ""
        elif name is not None:  # deeper indented: the entry's help goes on
            entries[name] = (entries[name] + " " + line.strip()).strip()
    return entries


def test_help_documents_every_command(cli):
    """``metalearner --help`` lists every command the parser accepts, each with a line of
    help; each command's ``--help`` documents every option its usage line shows (the
    parser's own list) and every option of DESIGN.md's contract, each with help text."""
    res = cli("no-such-command")
    assert res.returncode == 2
    commands = re.findall(r"'([\w-]+)'", res.stderr.split("expected one of", 1)[1])  # the parser's choices
    assert set(commands) >= {"train", "sweep", "compare", "sync", "data"}, res.stderr
    res = cli("--help")
    assert res.returncode == 0, res.stderr
    listed = {k: v for k, v in help_entries(res.stdout, "positional arguments:").items() if k != "COMMAND"}
    assert set(listed) == set(commands), res.stdout
    assert all(listed.values()), listed

    for command, contract in CONTRACT.items():
        res = cli(*command.split(), "--help")
        assert res.returncode == 0 and res.stdout.startswith(f"usage: metalearner {command} "), res.stderr
        usage = res.stdout.split("\n\n", 1)[0]
        shown = set(re.findall(r"[\s\[](--?[a-z][\w-]*)", usage)) - {"-h"}  # every option the parser has
        documented = help_entries(res.stdout, "options:")
        assert shown >= contract, (command, contract - shown)
        assert set(documented) - {"--help"} == shown, (command, res.stdout)
        empty = [name for name, text in documented.items() if not text]
        assert not empty, (command, empty)


def test_sweep_then_compare_then_train_the_exported_controller(cli, tmp_path, sqlite_uri):
    """The main job's path through the real command line: sweep, compare, export, train."""
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    uri = sqlite_uri
    res = cli("sweep", root / "experiments/compare_policies.yaml", "--smoke-test", "--tracking-uri", uri,
              "--storage", tmp_path / "ray", "--num-cpus", 2, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "verdict" in res.stdout and "mlflow ui --backend-store-uri" in res.stdout
    for arm in ("static", "schedule", "ewma", "plateau"):
        assert arm in res.stdout
    assert len(assert_view_finds_runs(uri, parent_of(res.stdout))) == 4
    res = cli("compare", "compare_policies", "--tracking-uri", uri, "--out", tmp_path / "report",
              "--export-best", tmp_path / "best.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "report" / "comparison.csv").is_file() and (tmp_path / "report" / "window.png").is_file()
    res = cli("train", "--task", "recall", "--steps", 3, "--controller-spec", tmp_path / "best.yaml",
              "--tracking-uri", uri, "--set", "model.preset=tiny", "--set", "train.seq_len=64", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("override,message", [
    ("train.steps=0", "train.steps: got 0, expected"),
    ("seeds=[]", "seeds: got [], expected at least 1 item"),
    # reaches arm validation (the arm itself is replaced), not the unknown-key check
    ("arms[0]=1", "arms[0]: got 1, expected a mapping"),
])
def test_bad_sweep_input_exits_2_before_ray_starts(cli, tmp_path, override, message):
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    res = cli("sweep", root / "experiments/compare_policies.yaml", "--set", override,
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", tmp_path / "ray", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists()


def test_compare_unknown_sweep_exits_2(cli, tmp_path, sqlite_uri):
    res = cli("compare", "nothing-here", "--tracking-uri", sqlite_uri, cwd=tmp_path)
    assert res.returncode == 2 and "nothing-here" in res.stderr
