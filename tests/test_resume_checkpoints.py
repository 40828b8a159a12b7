"""A resume that always resumes: the driver is killed, the checkpoints Tune's saved state
names are gone, and ``sweep --resume`` still finishes every trial with an exact trace.

Tune saves its experiment state now and then while ``num_to_keep`` prunes checkpoints, so
a killed driver can leave a state naming a checkpoint that is gone (ray-project/ray
#27790). Here the trap is made certain, from outside: a real ``metalearner sweep`` (real
local Ray, SQLite MLflow) is SIGKILLed while both comparison trials are mid-run; then, on
storage, one trial loses the checkpoint the state names (older ones stay) and the other
loses every checkpoint. ``sweep --resume`` must exit 0 with both runs FINISHED and each
trace key at steps 1..N exactly once: the first trial restores from its newest checkpoint
left, the second starts again from step 0, and the writer drops the replayed steps it holds.

The same repair is run on a copy of that Tune experiment in S3 (a real moto server, real
pyarrow S3 filesystem), before the local resume.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
from conftest import Sweep, history, wait_for

from metalearner.trace import STEP_KEYS
from trainables.restore import repair_checkpoints
from trainables.storage import experiment_uri

STEPS = 100
# a checkpoint with every report (Tune keeps 2 per trial); two trials, both in the comparison
SPEC = f"""\
name: trap
description: resume after the checkpoints Tune's state names are gone
task: {{name: recall, n_pairs: 4, distance: 16}}
model: {{preset: tiny, window: 8}}
train: {{steps: {STEPS}, batch_size: 8, seq_len: 32, report_every: 5, eval_every: 10, eval_batches: 1, lr: 0.01}}
seeds: [0]
resources: {{cpus_per_trial: 1}}
arms:
  - {{name: static, controller: {{name: static}}}}
  - {{name: ewma, controller: {{name: ewma, factor: 1.1, beta: 0.5, threshold: 0.0}}}}
"""


def checkpoints(trial_dir: Path) -> list[Path]:
    return sorted(trial_dir.glob("checkpoint_*"))


def saved_state(tune_dir: Path) -> dict[str, tuple[str, str | None, set[str]]]:
    """Trial folder -> (status, the checkpoint folder it names, every checkpoint folder it
    holds) in Tune's newest saved state."""
    from ray.tune.utils.serialization import TuneFunctionDecoder

    newest = max(tune_dir.glob("experiment_state-*.json"))
    named = {}
    for trial_json, meta_json in json.loads(newest.read_text())["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        manager = TuneFunctionDecoder(allow_cloudpickle=True).decode(json.dumps(meta["checkpoint_manager"]))
        latest = manager.latest_checkpoint_result
        named[trial["relative_logdir"]] = (trial["status"], latest.checkpoint.path.rsplit("/", 1)[-1] if latest else None,
                                           {r.checkpoint.path.rsplit("/", 1)[-1] for r in manager.best_checkpoint_results})
    return named


def test_resume_restores_from_the_checkpoints_left_or_from_step_0(tmp_path, s3_server):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Sweep(tmp_path, str(spec), "--storage", str(tmp_path / "ray"), "--tracking-uri", uri)
    try:
        # both trials are mid-run, and Tune has just saved a state that holds static's two
        # checkpoints on disk (so that, the named one deleted, static has one to restore from)
        def mid_run():
            trials = glob.glob(str(tmp_path / "ray" / "trap-compare-*" / "*-s0-*"))
            if len(trials) != 2 or not all(checkpoints(Path(t)) and checkpoints(Path(t))[-1].name >= "checkpoint_000003"
                                           for t in trials):
                return False
            (static,) = [Path(t) for t in trials if Path(t).name.startswith("static")]
            try:
                _, _, known = saved_state(static.parent)[static.name]
            except (KeyError, ValueError):  # no state yet, or one half written
                return False
            return {c.name for c in checkpoints(static)} == known

        wait_for(mid_run, first, what="both trials past their 4th checkpoint (step 20)")
        first.descendants()
        first.proc.kill()  # SIGKILL of the driver: no chance to save Tune's state again
        assert first.wait() < 0
    finally:
        first.close()  # the Ray processes it left, by pid
    (folder,) = {Path(p).parent for p in glob.glob(str(tmp_path / "ray" / "*" / "sweep_state.json"))}
    (tune_dir,) = (tmp_path / "ray").glob("trap-compare-*")
    named = saved_state(tune_dir)
    assert sorted(named) == sorted(p.name for p in tune_dir.glob("*-s0-*"))
    assert all(status != "TERMINATED" and ckpt for status, ckpt, _ in named.values()), named

    # the trap, made certain: "static" loses the checkpoint the state names, "ewma" every one
    (static,) = tune_dir.glob("static-s0-*")
    (ewma,) = tune_dir.glob("ewma-s0-*")
    newest = checkpoints(static)[-1].name  # perhaps one whose report the killed driver never processed
    shutil.rmtree(static / named[static.name][1], ignore_errors=True)  # (it may be pruned already)
    for ckpt in checkpoints(ewma):
        shutil.rmtree(ckpt)
    left = [c.name for c in checkpoints(static) if c.name != newest or newest in named[static.name][2]]
    expected = left[-1] if left else None  # the newest checkpoint left that the driver had processed
    assert expected is not None, (named, left)

    # the repair on S3: the same Tune experiment, copied to a bucket
    s3_dir = f"s3://sweeps/ray/{tune_dir.name}?allow_delayed_open=true"  # moto's endpoint: AWS_ENDPOINT_URL
    s3, s3_path = pafs.FileSystem.from_uri(s3_dir)
    pafs.copy_files(str(tune_dir), s3_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    repairs = {r.trial: r for r in repair_checkpoints(s3_dir)}
    assert repairs[static.name].named == named[static.name][1] and repairs[static.name].restored == expected
    assert repairs[ewma.name].named == named[ewma.name][1] and repairs[ewma.name].restored is None
    assert repair_checkpoints(s3_dir) == []  # the state on S3 now names what is there
    local = tmp_path / "from-s3"
    pafs.copy_files(s3_path, str(local), source_filesystem=s3, destination_filesystem=pafs.LocalFileSystem())
    assert saved_state(local)[static.name][1] == expected and saved_state(local)[ewma.name][1] is None

    second = Sweep(tmp_path, "--resume", str(folder))
    rc, out = second.finish()
    print(f"killed after {first.seconds:.0f} s, resumed in {second.seconds:.0f} s; static restored from {expected}")
    assert rc == 0, out
    assert f"{static.name}: its checkpoint {named[static.name][1]} is gone" in out, out
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("trap")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.data.tags["metalearner.arm"] for k in kids) == ["ewma", "static"]
    for k in kids:
        assert k.info.status == "FINISHED", k.info.run_name
        keys = [key for key in STEP_KEYS if not (key == "loss_ewma" and k.data.tags["metalearner.arm"] == "static")]
        for key in keys:
            assert [s for s, _ in history(client, k.info.run_id, key)] == list(range(1, STEPS + 1)), (k.info.run_name,
                                                                                                       key)
        assert [s for s, _ in history(client, k.info.run_id, "val_loss")] == list(range(5, STEPS + 1, 5))  # every report


def test_a_tune_experiment_under_a_uri_storage_keeps_the_uris_query_at_its_end():
    """``Tuner.restore`` and the repair are given this folder: pyarrow reads the query
    (endpoint, options) only at the end of the URI."""
    assert experiment_uri("s3://b/ray?allow_delayed_open=true", "e") == "s3://b/ray/e?allow_delayed_open=true"
    assert experiment_uri("s3://b/ray/", "e") == "s3://b/ray/e"
    assert experiment_uri("/tmp/ray", "e") == "/tmp/ray/e"
