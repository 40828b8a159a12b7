"""The HF Trainer engine: the same controlled run as the PyTorch loop, real Trainer, tiny model."""

import shutil

import mlflow
import pytest

pytest.importorskip("transformers", reason="needs the 'hf' extra")
pytest.importorskip("accelerate", reason="needs the 'hf' extra")

from metalearner.config import load_run_config  # noqa: E402
from metalearner.hf import CONTROLLER_FILE, load_controller, run_hf, save_controller  # noqa: E402
from metalearner.knobs import Knobs  # noqa: E402
from metalearner.trace import MemorySink, MultiSink  # noqa: E402
from metalearner.tracking import MlflowSink  # noqa: E402
from metalearner.train import TrainingRun, make_controller  # noqa: E402

STEPS = 20
KNOB_KEYS = ("rope_base", "window")
from metalearner.trace import STEP_KEYS as TRACE_KEYS  # noqa: E402 - the one definition


def make_cfg(steps=STEPS, **train):
    return load_run_config({
        "task": {"name": "recall", "n_pairs": 4, "distance": 16, "eval_size": 32},
        "model": {"preset": "tiny", "window": 4},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "eval_every": 8, "eval_batches": 1,
                  "warmup_steps": 4, **train},
        "controller": {"name": "ewma", "factor": 1.3, "beta": 0.5, "threshold": 0.0},
    })


@pytest.fixture(scope="module")
def hf_straight(tmp_path_factory):
    """An uninterrupted HF run of ``make_cfg()``: (trace rows, summary)."""
    sink = MemorySink()
    summary = run_hf(make_cfg(), sink, tmp_path_factory.mktemp("hf-straight"))
    return sink.rows, summary


def replay(ctrl, rows):
    """The knobs ``ctrl`` has the model use at each step when fed the losses of ``rows``
    (at step s: the knobs it chose after step s - 1)."""
    used = []
    for r in rows:
        used.append((ctrl.knobs.rope_base, float(ctrl.knobs.window)))
        ctrl.observe(r["step"], r["loss"])
    return used


def test_hf_moves_the_knobs_like_the_torch_loop(hf_straight):
    hf_rows, summary = hf_straight
    torch_sink = MemorySink()
    TrainingRun(make_cfg()).advance(STEPS, torch_sink)
    torch_rows = torch_sink.rows

    assert [r["step"] for r in hf_rows] == list(range(1, STEPS + 1))
    assert len({r["window"] for r in hf_rows}) > 1  # the knobs did move
    assert summary.steps == STEPS and summary.window_range == (min(r["window"] for r in hf_rows),
                                                               max(r["window"] for r in hf_rows))
    hf_knobs = [tuple(r[k] for k in KNOB_KEYS) for r in hf_rows]
    assert hf_knobs[0] == (10_000.0, 4.0)  # step 1 ran on the initial knobs
    # a fresh controller, and TrainingRun's own, fed the HF run's losses pick its knobs
    fresh = TrainingRun(make_cfg())
    assert hf_knobs == replay(make_controller(make_cfg(), fresh.model_config), hf_rows)
    assert hf_knobs == replay(fresh.controller, hf_rows)
    # same init, batches, optimizer, clip and learning rates: the engines agree bit for bit,
    # every key of every step (loss, knobs, lr, loss_ewma, val_loss, the task's metrics)
    for hf_row, torch_row in zip(hf_rows, torch_rows):
        assert hf_row == torch_row, f"step {torch_row['step']}: HF engine {hf_row} != torch loop {torch_row}"
    assert len(hf_rows) == len(torch_rows) == STEPS


def test_resume_from_an_hf_checkpoint_continues_the_controller_exactly(tmp_path, hf_straight):
    """Crash at step 14 (its record already in MLflow; last checkpoint at 10), resume:
    steps 11..20 repeat the straight run, and MLflow holds exactly one point per step per key."""
    straight, _ = hf_straight
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"

    class Crash(MemorySink):
        def log_metrics(self, metrics, step):
            if step == 14:
                raise RuntimeError("simulated crash at step 14")

    first = MlflowSink.start(uri, "hf-resume", "crashy")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_hf(make_cfg(), MultiSink(first, Crash()), out, checkpoint_every=10)
    first.close("KILLED")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10"]
    assert (out / "checkpoint-10" / CONTROLLER_FILE).is_file()

    again = MlflowSink.start(uri, "hf-resume", "crashy", resume_run_id=first.run_id)
    mem = MemorySink()
    summary = run_hf(make_cfg(), MultiSink(again, mem), out, resume=True)
    again.close()
    assert summary.steps == STEPS
    assert mem.params == {}  # a resumed run does not log its params again
    assert mem.rows == straight[10:]  # loss, knobs, lr, val_loss: all identical
    client = mlflow.MlflowClient(tracking_uri=uri)
    for key in TRACE_KEYS:
        hist = sorted(client.get_metric_history(first.run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(1, STEPS + 1)), key
        assert [m.value for m in hist] == [r[key] for r in straight], key


def test_speech_run_writes_a_complete_trace_to_mlflow(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs the espeak-ng Debian package")
    from metalearner.tasks.speech_data import generate_speech_digits

    data = generate_speech_digits(tmp_path / "d", 24, seed=0, progress=False)
    steps = 6
    cfg = load_run_config({
        "task": {"name": "speech", "data_dir": str(data), "eval_size": 4, "cer_samples": 2},
        "model": {"preset": "tiny"},
        "train": {"steps": steps, "batch_size": 4, "eval_every": 4, "eval_batches": 1, "warmup_steps": 2},
        "controller": {"name": "ewma", "factor": 1.3, "beta": 0.5, "threshold": 0.0},
    })
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = MlflowSink.start(uri, "hf-speech", "speech")
    summary = run_hf(cfg, sink, tmp_path / "out")
    sink.close()
    assert summary.steps == steps and "cer" in summary.eval_metrics

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "encoder_decoder" and run.data.params["controller.name"] == "ewma"
    for key in TRACE_KEYS:
        assert sorted(m.step for m in client.get_metric_history(sink.run_id, key)) == list(range(1, steps + 1)), key
    for key in ("val_loss", "cer"):
        assert sorted(m.step for m in client.get_metric_history(sink.run_id, key)) == [4, 6], key


def test_cli_trains_with_the_hf_engine(cli, sqlite_uri, tmp_path):
    res = cli("train", "--engine", "hf", "--task", "recall", "--steps", "10", "--set", "model.preset=tiny",
              "--set", "train.seq_len=64", "--tracking-uri", sqlite_uri, "--trace-csv", tmp_path / "trace.csv",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "steps            10" in res.stdout and "MLflow run" in res.stdout
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metalearner-train").experiment_id])
    assert run.data.params["train.engine"] == "hf" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "window")) == list(range(1, 11))
    assert len((tmp_path / "trace.csv").read_text().splitlines()) == 11


def test_controller_json_round_trips_the_state(tmp_path):
    """``controller.json`` holds ``controller.state_dict()`` (floats exact through JSON)."""
    cfg = make_cfg()
    run = TrainingRun(cfg)
    for s, loss in enumerate([3.0, 2.5, float("nan"), 2.7, 2.2], 1):
        run.model.apply_knobs(run.controller.observe(s, loss))
    save_controller(run, tmp_path)
    other = TrainingRun(cfg)
    load_controller(other, tmp_path)
    assert other.controller.state_dict() == run.controller.state_dict()
    assert other.model.knobs == run.controller.knobs != Knobs(10_000.0, 4)
