"""An HF model in a sweep, as the built-in model: a tiny random Qwen2 (transformers' own
code) tuned online by PBT in a real ``metalearner sweep`` on a local Ray of 2 CPUs, writing
to a real MLflow SQLite store; the sweep is interrupted (SIGINT after its first report) and
resumed with ``--resume``.

One sweep serves every test here: its exit codes (130, then 0), complete traces (one
point per step per key in every trial, across the interrupt), a PBT perturbation of a
controller setting mid-run, and the best controller in ``best_ARM.yaml`` and in the
export (`export_best_controller`, what ``compare --export-best`` writes).
"""

from __future__ import annotations

import glob
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import Sweep, history, wait_for
from test_sweep_lifecycle import Journal

from metalearner.trace import STEP_KEYS

pytest.importorskip("transformers", reason="needs the 'hf' extra")

STEPS, ARM = 20, "ewma-pbt"
SPEC = {
    "name": "hf-pbt",
    "task": {"name": "recall", "n_pairs": 2, "distance": 8},
    "model": {"hf": {"config": {  # experiments/hf_qwen2.yaml's smoke sizes
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "use_sliding_window": True, "max_window_layers": 1, "sliding_window": 8}}},
    "train": {"steps": STEPS, "batch_size": 4, "seq_len": 32, "report_every": 5, "eval_every": 5,
              "eval_batches": 1, "warmup_steps": 2, "lr": 0.01},
    "seeds": [0],
    "resources": {"cpus_per_trial": 1},
    "arms": [{
        "name": ARM, "controller": {"name": "ewma", "beta": 0.5, "threshold": 0.0},
        # synch PBT: both members meet at step 10 and the worse one takes the better one's
        # checkpoint and a new factor there, whatever the order their reports come in
        "search": {"searcher": "random", "num_samples": 2, "seed": 7, "confirm": False,
                   "scheduler": {"name": "pbt", "perturbation_interval": 10, "quantile_fraction": 0.5,
                                 "resample_probability": 1.0},
                   "space": {"controller.factor": {"uniform": [1.01, 1.5]}}},
    }],
}


@dataclass
class Outcome:
    uri: str
    folder: Path
    rc_interrupted: int
    out_interrupted: str
    status_interrupted: str  # the parent run's status between the two drivers
    rc_resumed: int
    out_resumed: str


@pytest.fixture(scope="module")
def hf_pbt_sweep(tmp_path_factory, empty_store) -> Outcome:
    tmp = tmp_path_factory.mktemp("hf-pbt")
    shutil.copyfile(empty_store, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    (tmp / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    first = Sweep(tmp, "spec.yaml", "--storage", str(tmp / "ray"), "--tracking-uri", uri)
    try:
        journal = Journal(tmp, SPEC["name"])
        wait_for(lambda: journal.reported("search"), first, what="a first report of a PBT member")
        first.proc.send_signal(signal.SIGINT)
        rc1 = first.wait()
        out1 = first.output()
    finally:
        first.close()
    (folder,) = {Path(p).parent for p in glob.glob(str(tmp / "ray" / "*" / "sweep_state.json"))}
    _, parent, _ = runs_of(uri)
    rc2, out2 = Sweep(tmp, "--resume", str(folder)).finish()
    return Outcome(uri, folder, rc1, out1, parent.info.status, rc2, out2)


def runs_of(uri: str):
    """(client, the sweep's one parent run, its child runs)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(SPEC["name"])
    parents = client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'sweep'")
    assert len(parents) == 1, [p.info.run_id for p in parents]  # a resume keeps the one parent run
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'",
                              max_results=1000)
    return client, parents[0], kids


def test_an_interrupted_hf_pbt_sweep_exits_130_and_resumes_to_0(hf_pbt_sweep):
    o = hf_pbt_sweep
    assert o.rc_interrupted == 130, o.out_interrupted[-3000:]
    assert f"metalearner sweep --resume {o.folder}" in o.out_interrupted, o.out_interrupted[-3000:]
    assert o.status_interrupted == "KILLED"
    assert o.rc_resumed == 0, o.out_resumed[-3000:]
    assert "resumed" in o.out_resumed and "trace audit: one point per step per key in every run" in o.out_resumed
    _, parent, kids = runs_of(o.uri)
    assert parent.info.status == "FINISHED" and "metalearner.interrupted" not in parent.data.tags
    assert len(kids) == 2 and {k.info.status for k in kids} == {"FINISHED"}
    for k in kids:
        assert k.data.params["model.model_type"] == "qwen2" and k.data.params["model.sliding_layers"] == "1"
        assert k.data.tags["metalearner.arm"] == ARM and "metalearner.interrupted" not in k.data.tags


def test_every_hf_trial_has_one_point_per_step_across_the_interrupt(hf_pbt_sweep):
    client, _, kids = runs_of(hf_pbt_sweep.uri)
    moved = set()
    for k in kids:
        for key in STEP_KEYS:
            steps = [s for s, _ in history(client, k.info.run_id, key)]
            assert steps == list(range(1, STEPS + 1)), (k.info.run_name, key, steps)
        assert [s for s, _ in history(client, k.info.run_id, "val_loss")] == list(range(5, STEPS + 1, 5))
        moved |= {v for _, v in history(client, k.info.run_id, "window")}
    assert len(moved) > 1  # the controller moved the HF model's window on the workers


def test_pbt_changes_a_controller_setting_of_an_hf_trial_mid_run(hf_pbt_sweep):
    client, _, kids = runs_of(hf_pbt_sweep.uri)
    perturbed = []
    for k in kids:
        factors = history(client, k.info.run_id, "controller.factor")
        assert factors[0][0] == 1 and float(k.data.params["controller.factor"]) == factors[0][1]
        assert all(1.01 <= f <= 1.5 for _, f in factors), factors  # inside the space
        if len({f for _, f in factors}) > 1:
            perturbed.append(factors)
    assert perturbed, "PBT changed no trial's controller.factor"
    assert all(1 < s <= STEPS for factors in perturbed for s, _ in factors[1:])  # mid-run, not at the start


def test_the_best_hf_controller_is_exported_with_its_final_settings(hf_pbt_sweep, tmp_path):
    from metalearner.report import export_best_controller, load_traces

    o = hf_pbt_sweep
    client, parent, kids = runs_of(o.uri)
    finals = {history(client, k.info.run_id, "controller.factor")[-1][1] for k in kids}
    best = yaml.safe_load((o.folder / f"best_{ARM}.yaml").read_text())["controller"]
    assert best["name"] == "ewma" and best["beta"] == 0.5 and best["factor"] in finals, (best, finals)
    assert f"best '{ARM}' controller" in o.out_resumed
    runs, traces = load_traces(o.uri, parent.info.run_id)
    doc = export_best_controller(runs, traces, tmp_path / "best.yaml", arm=ARM)
    assert doc["controller"]["name"] == "ewma" and doc["controller"]["factor"] in finals
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == doc
