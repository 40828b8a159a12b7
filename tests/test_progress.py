"""The sweep's live progress table: one row per trial, a rich table on a terminal, a
throttled plain line elsewhere. Unit tests of one class: the trials are stand-ins with
the two attributes the table reads (``trial_id``, ``config``)."""

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from trainables.progress import ProgressTable

TOTAL = 40


def trial(tid, arm, seed, wrapped=True):
    """A Tune trial as the table sees it: grid cells wrap their config in ``cell``,
    searched trials carry it at the top level."""
    cfg = {"train": {"seed": seed, "steps": TOTAL}, "controller": {"name": "ewma"},
           "meta": {"arm": arm, "phase": "compare"}}
    return SimpleNamespace(trial_id=tid, config={"cell": cfg} if wrapped else cfg)


def result(step, loss, base, window, val_loss=None):
    out = {"step": step, "loss": loss, "rope_base": base, "window": window, "total_steps": TOTAL}
    if val_loss is not None:
        out["val_loss"] = val_loss
    return out


@pytest.fixture
def clock(monkeypatch):
    """A settable monotonic clock (the plain display prints at most every 10 seconds)."""
    now = {"t": 1000.0}
    monkeypatch.setattr("time.monotonic", lambda: now["t"])
    return now


def rendered(progress):
    """The rich table as a terminal would show it."""
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(progress._table())
    return out.getvalue()


def test_plain_lines_summarize_the_running_trials_and_are_throttled(capsys, clock):
    p = ProgressTable(TOTAL, "demo: tuning", interactive=False)
    a, b = trial("t1", "ewma", 0), trial("t2", "static", 1, wrapped=False)
    p.update(a, "RUNNING", None)
    p.update(b, "RUNNING", None)  # within 10 s of the first line: nothing printed
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[demo: tuning] 1 trials: 1 running, 0 done | ewma/s0 step 0 loss  w "]

    clock["t"] += 11
    p.update(a, "RUNNING", result(10, 2.34567, 12_000.0, 6.0))
    assert capsys.readouterr().out.splitlines() == [
        "[demo: tuning] 2 trials: 2 running, 0 done | ewma/s0 step 10 loss 2.3457 w 6 | static/s1 step 0 loss  w "]

    clock["t"] += 1
    p.update(a, "TERMINATED", None)  # status changes; the last values stay
    assert capsys.readouterr().out == ""
    p.render(final=True)  # the final line always prints
    assert capsys.readouterr().out.splitlines() == [
        "[demo: tuning] 2 trials: 1 running, 1 done | static/s1 step 0 loss  w "]
    assert p.rows["t1"] == {"arm": "ewma", "seed": 0, "status": "TERMINATED", "step": 10, "loss": 2.34567,
                            "rope_base": 12_000.0, "window": 6.0, "val_loss": None}


def test_plain_line_lists_at_most_four_running_trials(capsys, clock):
    p = ProgressTable(TOTAL, "many", interactive=False)
    for i in range(6):
        p.update(trial(f"t{i}", f"arm{i}", i), "RUNNING", None)
    p.render(final=True)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("[many] 6 trials: 6 running, 0 done")
    assert last.count(" | ") == 4 and "arm3/s3" in last and "arm4/s4" not in last


def test_rich_table_has_one_row_per_trial_with_formatted_values(capsys):
    p = ProgressTable(TOTAL, "demo: comparison", interactive=True)
    try:
        assert p._live is not None  # a live display while the sweep runs
        p.update(trial("t1", "ewma", 0), "RUNNING", result(20, 1.5, 123_456.7, 17.0, val_loss=1.75))
        p.update(trial("t2", "static", 1), "ERROR", None)
        text = rendered(p)
    finally:
        p.render(final=True)
    assert p._live is None  # the final render stops the live display
    assert "demo: comparison" in text
    for col in ("trial", "arm", "seed", "status", "step", "loss", "base", "window", "val loss"):
        assert col in text
    table = p._table()
    rows = list(zip(*[list(col.cells) for col in table.columns]))
    assert rows == [("t1", "ewma", "0", "RUNNING", "20/40", "1.5000", "1.235e+05", "17", "1.7500"),
                    ("t2", "static", "1", "ERROR", "0/40", "", "", "", "")]
    p.stop()  # stopping again is harmless
