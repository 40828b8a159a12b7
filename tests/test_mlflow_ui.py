"""The MLflow review lands on the answer: a real browser opens the link a sweep prints.

A smoke sweep (the quickstart's smoke block: 4 arms, one of them tuned by a 2-trial ASHA
search) runs through the real CLI into a tmp SQLite store; `mlflow server` serves that
store on a free local port (its own process group, ended by pgid); headless Chromium
(Debian's ``chromium``, driven by Playwright; no browser download) opens the printed
link and must show, with no click: the chart view, the runs grouped by arm, the window
and rope-base traces, and one line colour per arm. The screenshot is kept in
``tests/artifacts/mlflow_ui_view.png`` (gitignored) for a human to look at.

Slow on a loaded machine (the MLflow frontend and Plotly render on the CPU): minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from metalearner.report.view import KNOB_SECTION, charted_keys, grouped_by, read_saved_view
from metalearner.tracking import (
    ARM_TAG,
    NOTE_TAG,
    RUN_COLOR_TAG,
    SEARCH_GREY,
    SHARED_VIEW_PREFIX,
    TrackingReader,
    ui_features,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium")
ARMS = ("static", "schedule", "ewma-seed", "ewma-tuned")

try:
    import playwright.sync_api  # noqa: F401

    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and HAVE_PLAYWRIGHT),
    reason="needs Debian's chromium (apt-get install chromium) and playwright (pip install playwright; "
           "never `playwright install`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, empty_store):
    """The quickstart's smoke sweep through the real CLI; returns (uri, stdout)."""
    tmp = tmp_path_factory.mktemp("ui-sweep")
    shutil.copyfile(empty_store, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "metalearner.cli", "sweep", str(ROOT / "experiments/quickstart.yaml"),
                          "--smoke-test", "--tracking-uri", uri, "--storage", str(tmp / "ray"), "--num-cpus", "2",
                          "--out", str(tmp / "report")], cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return uri, out.stdout


def printed_link(stdout: str) -> str:
    links = re.findall(r"then open (http\S+)", stdout)
    assert links, stdout[-2000:]
    return links[-1]


def test_the_store_carries_what_the_ui_needs(smoke_sweep):
    uri, stdout = smoke_sweep
    link = printed_link(stdout)
    for part in ("workflowType=machine_learning", "compareRunsMode=CHART", "viewStateShareKey="):
        assert part in link
    reader = TrackingReader(uri)
    parent = reader.find_sweep("quickstart")
    exp_id = reader.experiment_id(parent)
    assert f"#/experiments/{exp_id}/runs?" in link
    key = re.search(r"viewStateShareKey=([0-9a-f]+)", link).group(1)
    state = read_saved_view(reader.saved_view(exp_id, key))
    assert charted_keys(state)[:2] == ["window", "rope_base"]
    assert list(grouped_by(state)) == [ARM_TAG]
    assert state["useGroupedValuesInCharts"] is False and state["runsHiddenMode"] == "SHOW_ALL"
    assert SHARED_VIEW_PREFIX + key in reader.client.get_experiment(exp_id).tags

    trials = reader.trials(parent.info.run_id)
    compare = [t for t in trials if t.data.tags["metalearner.phase"] == "compare"]
    search = [t for t in trials if t.data.tags["metalearner.phase"] == "search"]
    assert {t.data.tags[ARM_TAG] for t in compare} == set(ARMS) and len(search) == 2
    colour = {}
    for t in compare:
        colour.setdefault(t.data.tags[ARM_TAG], set()).add(t.data.tags[RUN_COLOR_TAG])
    assert all(len(c) == 1 for c in colour.values())  # one colour per arm...
    assert len({next(iter(c)) for c in colour.values()}) == len(ARMS)  # ...distinct across arms
    assert {t.data.tags[RUN_COLOR_TAG] for t in search} == {SEARCH_GREY}
    for t in trials:
        assert {"val_loss_final", "steps_completed"} <= set(t.data.metrics), t.info.run_name
        assert "null" not in t.data.params.values(), t.info.run_name  # a None param is not logged
        if t.data.tags.get("metalearner.stopped_early"):
            assert "Stopped early by the ASHA scheduler" in t.data.tags[NOTE_TAG]
    static = [t for t in compare if t.data.tags[ARM_TAG] == "static"]
    assert "controller.factor" not in static[0].data.params

    parent = reader.client.get_run(parent.info.run_id)
    note = parent.data.tags[NOTE_TAG]
    assert note.startswith("**") and "vs static:" in note.splitlines()[0]
    assert link in note.split("\n\n")[0]  # the link is within the lines shown before "Show more"
    for arm in ARMS:
        assert f"compare/{arm}/val_loss_mean" in parent.data.metrics


@needs_browser
def test_the_printed_link_opens_on_the_traces_grouped_and_coloured_by_arm(smoke_sweep):
    from playwright.sync_api import sync_playwright

    assert ui_features()["saved_view"], "the installed MLflow is not one whose saved view was verified"
    uri, stdout = smoke_sweep
    link = printed_link(stdout)
    fragment = link[link.index("#"):]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not answer within 300 s"
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(240_000)
                page.goto(base + "/" + fragment)  # the printed link on this server: no click from here on
                page.wait_for_function(
                    "() => /[1-9][0-9]* matching runs/.test(document.body.innerText)", timeout=240_000)
                for arm in ARMS:
                    page.get_by_text(f"Group: {arm}", exact=True).wait_for(state="visible")
                page.get_by_text(re.compile("^" + re.escape(KNOB_SECTION[:20]))).first.wait_for(state="visible")
                # every compare trial drawn in the window chart, one stroke colour per arm
                strokes = page.wait_for_function(
                    """(n) => {
                        const plots = [...document.querySelectorAll('.js-plotly-plot')];
                        const colours = plots.slice(0, 2).map(p => new Set([...p.querySelectorAll('path.js-line')]
                            .map(l => getComputedStyle(l).stroke)));
                        return colours.length == 2 && colours.every(c => c.size >= n) ? colours.map(c => [...c]) : null;
                    }""", arg=len(ARMS), timeout=240_000).json_value()
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / "mlflow_ui_view.png"
                page.screenshot(path=str(shot), timeout=240_000)
                print(f"\nscreenshot: {shot}")
                body = page.inner_text("body")
            finally:
                browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
    assert "Group by: metalearner.arm" in body
    assert "window" in body and "rope_base" in body
    reader = TrackingReader(uri)
    arm_colours = {t.data.tags[RUN_COLOR_TAG] for t in reader.trials(reader.find_sweep("quickstart").info.run_id)
                   if t.data.tags["metalearner.phase"] == "compare"}

    def rgb(hex_colour: str) -> str:
        r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return f"rgb({r}, {g}, {b})"

    for chart in strokes:  # window and rope_base: the lines are drawn in the arms' colours
        assert {rgb(c) for c in arm_colours} <= set(chart), (chart, arm_colours)
