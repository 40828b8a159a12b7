"""The speech study's smoke sweep on a real local Ray with freshly synthesized speech."""

import shutil
from pathlib import Path

import mlflow
import pytest
from _view import ViewProbe, assert_view_finds_runs

from metalearner.experiment import load_experiment

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng Debian package")


def test_speech_ewma_smoke_sweep(tmp_path, sqlite_uri):
    import ray

    from metalearner.tasks.speech_data import generate_speech_digits
    from trainables.sweep import SweepRunner

    data = generate_speech_digits(tmp_path / "digits", 40, seed=0, progress=False)
    spec = load_experiment(ROOT / "experiments/speech_ewma.yaml", smoke=True, overrides=[f"task.data_dir={data}"])
    uri = sqlite_uri
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        probe = ViewProbe(uri)
        result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False, on_event=probe).run()
    finally:
        ray.shutdown()
    assert not result.errors
    assert [p for p, _ in probe.checked] == ["search:ewma-tuned"]
    assert len(assert_view_finds_runs(uri, result.parent_run_id)) == 2  # static + the confirmed best
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("speech_ewma")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(runs) == 3  # static + 1 search trial + the best re-trained on seed 0
    for r in runs:
        assert r.data.params["model.arch"] == "encoder_decoder"
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "window"))
        assert steps == list(range(1, 11))
        assert [m.step for m in client.get_metric_history(r.info.run_id, "cer")]
