"""Trace sinks: the CSV file of ``--trace-csv`` holds the run's trace exactly; MultiSink fans out."""

import csv

from metalearner.config import load_run_config
from metalearner.trace import TRACE_KEYS, CsvSink, MemorySink, MultiSink, TraceSink
from metalearner.train import TrainingRun, train

STEPS = 12


def make_cfg(controller):
    return load_run_config({
        "task": {"name": "recall", "n_pairs": 4, "distance": 16, "eval_size": 16},
        "model": {"preset": "tiny", "window": 4},
        "train": {"steps": STEPS, "batch_size": 8, "seq_len": 32, "eval_every": 5, "eval_batches": 1,
                  "warmup_steps": 2, "seed": 7},
        "controller": controller,
    })


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_csv_holds_every_step_of_a_real_run_exactly(tmp_path):
    """The CSV of a real run equals the in-memory trace: one row per step in order, every
    value exact (floats round-trip), evaluation columns filled at evaluation steps only."""
    run = TrainingRun(make_cfg({"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0}))
    path = tmp_path / "nested" / "dir" / "trace.csv"  # parent folders are created
    csv_sink, mem = CsvSink(path, tuple(run.task.eval_metric_names)), MemorySink()
    train(run, MultiSink(csv_sink, mem), progress=False)
    csv_sink.close()

    header, rows = read_csv(path)
    assert header == ["step", *TRACE_KEYS, "nonfinite_steps", "recall_acc"]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert len({r["window"] for r in rows}) > 1  # the knobs moved: the columns carry the trace
    for row, rec in zip(rows, mem.rows, strict=True):
        assert set(rec) <= set(header)  # nothing the run traced is dropped
        for key in header:
            if key in rec:
                assert float(row[key]) == rec[key], (rec["step"], key, row[key])
            else:
                assert row[key] == "", (rec["step"], key, row[key])
    # evaluation every 5 steps and at the last step
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [5, 10, 12]
    assert [int(r["step"]) for r in rows if r["recall_acc"]] == [5, 10, 12]


def test_csv_leaves_blank_what_a_controller_does_not_have(tmp_path):
    """A static controller has no running loss: its ``loss_ewma`` column stays blank, the
    knob columns hold the constant knobs."""
    run = TrainingRun(make_cfg({"name": "static"}))
    sink = CsvSink(tmp_path / "static.csv")
    sink.log_params(run.params())  # the CSV holds the trace only
    train(run, sink, progress=False)
    sink.close()
    sink.close()  # closing twice is harmless (the CLI closes on every exit path)

    header, rows = read_csv(tmp_path / "static.csv")
    assert header == ["step", *TRACE_KEYS, "nonfinite_steps"]
    assert len(rows) == STEPS
    assert all(r["loss_ewma"] == "" for r in rows)
    assert {(float(r["rope_base"]), float(r["window"])) for r in rows} == {(10_000.0, 4.0)}
    assert all(float(r["loss"]) > 0 for r in rows)


def test_csv_sink_starts_a_fresh_file(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("stale,contents\n1,2\n")
    sink = CsvSink(path)
    sink.log_metrics({"loss": 2.5, "rope_base": 10_000.0, "window": 4.0, "lr": 0.001}, 1)
    sink.close()
    header, rows = read_csv(path)
    assert header == ["step", *TRACE_KEYS, "nonfinite_steps"]
    assert rows == [{"step": "1", "loss": "2.5", "loss_ewma": "", "rope_base": "10000.0", "window": "4.0",
                     "lr": "0.001", "val_loss": "", "nonfinite_steps": ""}]


def test_multisink_sends_every_call_to_each_sink_and_skips_none():
    a, b = MemorySink(), MemorySink()
    sink = MultiSink(a, None, b)
    assert isinstance(sink, TraceSink) and sink.sinks == [a, b]
    sink.log_params({"controller.name": "ewma"})
    sink.log_metrics({"loss": 1.0}, 1)
    sink.log_metrics({"loss": 0.5, "val_loss": 0.7}, 2)
    sink.close("KILLED")
    for s in (a, b):
        assert s.params == {"controller.name": "ewma"}
        assert s.rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "val_loss": 0.7}]
        assert s.status == "KILLED"
