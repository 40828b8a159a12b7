"""The MLflow review lands on the answer: a real browser opens the link a sweep prints.

Two smoke sweeps run through the real CLI into one tmp SQLite store, which `mlflow server`
serves on a free local port (its own process group, ended by pgid) from the start: the
quickstart's (4 arms, one of them tuned by a 2-trial ASHA search) and
``experiments/pbt_ewma.yaml`` (PBT only, ``confirm: false``: every trial a search trial).
Headless Chromium (Debian's ``chromium``, driven by Playwright; no browser download) opens
the link each sweep prints when it starts, with no click from there on:

- while the quickstart sweep runs (after its first trial reported; the sweep's driver, the
  store's one writer, is stopped with SIGSTOP at a moment it holds no lock of the store,
  so the page shows a store caught mid-sweep, then SIGCONT): the trials the view selects,
  the running ones among them, are on the page, and the description says what runs;
- at its end: the answer (the description's first line, the overall verdict with the
  minimum detectable effect), the chart view with the window and rope-base traces of the
  comparison trials, grouped by arm, one line colour per arm;
- at the PBT sweep's end: its population's trials, their knob traces and the settings PBT
  moved, and the answer of a sweep without a comparison.

Screenshots go to ``$METALEARNER_TEST_ARTIFACTS`` (default ``tests/artifacts/``,
gitignored): ``mlflow_ui_running.png``, ``mlflow_ui_view.png`` (the README's
``docs/review_end.png``) and ``mlflow_ui_pbt.png`` (``docs/review_pbt.png``).

Slow on a loaded machine (the MLflow frontend and Plotly render on the CPU): minutes.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from _view import assert_view_finds_runs, parent_of
from conftest import Sweep, wait_for

from metalearner.report.view import FRONT_SECTION, KNOB_SECTION, SETTINGS_SECTION, charted_keys, grouped_by, read_saved_view
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
ARTIFACTS = Path(os.environ.get("METALEARNER_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
CHROMIUM = shutil.which("chromium")
ARMS = ("static", "schedule", "ewma-seed", "ewma-tuned")
START_LINK = re.compile(r"open the review: (http\S+)")

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


class UiServer:
    """``mlflow server`` on the module's store, in its own process group."""

    def __init__(self, uri: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.up = False

    def wait(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while not self.up:
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                self.up = True
            except (OSError, http.client.HTTPException):
                assert self.proc.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, f"mlflow server did not answer within {timeout} s"
                time.sleep(1)
        return self.base

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_store):
    tmp = tmp_path_factory.mktemp("ui-store")
    shutil.copyfile(empty_store, tmp / "mlflow.db")
    return SimpleNamespace(tmp=tmp, uri=f"sqlite:///{tmp / 'mlflow.db'}")


@pytest.fixture(scope="module")
def ui(store):
    """The UI on the store, started before the sweeps (it takes tens of seconds to come up)."""
    server = UiServer(store.uri)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module, or None without one (the store checks still run)."""
    if not (CHROMIUM and HAVE_PLAYWRIGHT):
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def sweep_args(store, spec: str) -> list[str]:
    return [str(ROOT / spec), "--smoke-test", "--tracking-uri", store.uri, "--storage", str(store.tmp / "ray"),
            "--out", str(store.tmp / f"report-{Path(spec).stem}")]


def open_link(browser, base: str, link: str, shot: str, answer: str):
    """Open the printed link on this server (no click from here on); wait until the runs,
    the description's first line (``answer``, a regex) and the knob charts are drawn;
    screenshot. Returns the page (the caller closes it)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.set_default_timeout(240_000)
    page.goto(base + "/" + link[link.index("#"):])
    page.wait_for_function("() => /[1-9][0-9]* matching runs/.test(document.body.innerText)", timeout=240_000)
    page.get_by_text(re.compile("^" + re.escape(KNOB_SECTION[:20]))).first.wait_for(state="visible")
    page.get_by_text(re.compile("^" + re.escape(FRONT_SECTION[:20]))).first.wait_for(state="visible")  # the Pareto scatter
    top = page.get_by_text(re.compile(answer)).first
    top.wait_for(state="visible")
    box = top.bounding_box()  # the description is collapsed to its first line: that line is on screen
    assert box and box["height"] > 0 and box["y"] < 150, box
    page.wait_for_function(  # the knob charts have drawn their lines
        "() => [...document.querySelectorAll('.js-plotly-plot')].slice(0, 2)"
        ".filter(p => p.querySelectorAll('path.js-line').length > 0).length == 2", timeout=240_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), timeout=240_000)
    print(f"\nscreenshot: {ARTIFACTS / shot}")
    return page


@contextmanager
def paused(sweep: Sweep, db: Path):
    """The sweep's driver stopped (SIGSTOP) where it holds no lock of the SQLite store (it is
    the store's one writer: the store stays as it is, readable), continued (SIGCONT) after."""
    pid = sweep.proc.pid
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        try:
            con = sqlite3.connect(db, timeout=0.2)
            try:
                con.execute("BEGIN IMMEDIATE")  # fails while a stopped transaction holds the store
                con.rollback()
                break
            finally:
                con.close()
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
    else:
        raise AssertionError("the sweep's driver always held the store's lock")
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def smoke_sweep(store, ui, chromium):
    """The quickstart's smoke sweep through the real CLI. While it runs, once its first trial
    has reported, the browser (when there is one) opens the link it printed at its start."""
    sweep = Sweep(store.tmp, *sweep_args(store, "experiments/quickstart.yaml"))
    midway = None
    try:
        link = wait_for(lambda: (START_LINK.findall(sweep.output()) or [None])[0], sweep, 600, "the link")
        if chromium is not None:
            base = ui.wait()
            client = mlflow.MlflowClient(tracking_uri=store.uri)
            exp_id = re.search(r"#/experiments/(\d+)/", link).group(1)
            reporting = "attributes.status = 'RUNNING' AND metrics.loss > -1e30 AND tags.`metalearner.kind` = 'trial'"
            wait_for(lambda: client.search_runs([exp_id], reporting), sweep, 600, "the first trial's report")
            with paused(sweep, store.tmp / "mlflow.db"):
                assert sweep.proc.poll() is None, "the sweep ended"
                key = re.search(r"viewStateShareKey=([0-9a-f]+)", link).group(1)
                state = read_saved_view(client.get_experiment(exp_id).tags[SHARED_VIEW_PREFIX + key])
                shown = client.search_runs([exp_id], state["searchFilter"])  # what the page will show
                page = open_link(chromium, base, link, "mlflow_ui_running.png",
                                 r"running: (tuning ewma-tuned|comparison at equal steps)")
                midway = SimpleNamespace(body=page.inner_text("body"), filter=state["searchFilter"],
                                         running=[t.info.run_name for t in shown if t.info.status == "RUNNING"],
                                         shown=[t.info.run_name for t in shown])
                page.close()
        rc, out = sweep.finish(timeout=900)
    finally:
        sweep.close()
    assert rc == 0, out[-4000:]
    return SimpleNamespace(uri=store.uri, stdout=out, start_link=link, midway=midway)


@pytest.fixture(scope="module")
def pbt_sweep(store, smoke_sweep):
    """``experiments/pbt_ewma.yaml --smoke-test`` into the same store, after the quickstart's."""
    rc, out = Sweep(store.tmp, *sweep_args(store, "experiments/pbt_ewma.yaml")).finish(timeout=900)
    assert rc == 0, out[-4000:]
    return SimpleNamespace(uri=store.uri, stdout=out, start_link=START_LINK.findall(out)[0])


def printed_link(stdout: str) -> str:
    links = re.findall(r"then open (http\S+)", stdout)
    assert links, stdout[-2000:]
    return links[-1]


def test_the_store_carries_what_the_ui_needs(smoke_sweep):
    uri, stdout = smoke_sweep.uri, smoke_sweep.stdout
    link = printed_link(stdout)
    assert link == smoke_sweep.start_link  # one link, printed at the start, still the one at the end
    assert stdout.index("open the review:") < stdout.index("[quickstart: tuning ewma-tuned]")  # before any trial
    for part in ("workflowType=machine_learning", "compareRunsMode=CHART", "viewStateShareKey="):
        assert part in link
    reader = TrackingReader(uri)
    parent = reader.find_sweep("quickstart")
    assert parent.info.run_id == parent_of(stdout)
    exp_id = reader.experiment_id(parent)
    assert f"#/experiments/{exp_id}/runs?" in link
    key = re.search(r"viewStateShareKey=([0-9a-f]+)", link).group(1)
    state = read_saved_view(reader.saved_view(exp_id, key))
    assert charted_keys(state)[:2] == ["window", "rope_base"]
    assert list(grouped_by(state)) == [ARM_TAG]
    assert state["useGroupedValuesInCharts"] is False and state["runsHiddenMode"] == "SHOW_ALL"
    assert SHARED_VIEW_PREFIX + key in reader.client.get_experiment(exp_id).tags
    hits = assert_view_finds_runs(uri, parent.info.run_id, searched=True)
    assert sorted(r.data.tags[ARM_TAG] for r in hits) == sorted(ARMS)  # the comparison's trials

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
    assert note.startswith("**no arm differs from static at n=1"), note  # the overall answer, not an arm's line
    assert link[link.index("#"):] in note.split("\n\n")[0]  # the link is within the lines shown before "Show more"
    for arm in ARMS:
        assert f"compare/{arm}/val_loss_mean" in parent.data.metrics
    # the best controller the command line prints, on the parent run, with its YAML
    best = {k.split(".")[-1]: v for k, v in parent.data.params.items() if k.startswith("best.ewma-tuned.")}
    assert best["name"] == "ewma" and 1.001 <= float(best["factor"]) <= 1.05
    assert f"factor={float(best['factor']):.6g}" in stdout
    assert "best_ewma-tuned.yaml" in [a.path for a in reader.client.list_artifacts(parent.info.run_id)]
    described = reader.client.get_experiment(exp_id).tags[NOTE_TAG]
    assert described.splitlines()[0] == note.splitlines()[0]  # the answer, on the landing page


@needs_browser
def test_while_the_sweep_runs_its_link_shows_the_running_trials(smoke_sweep):
    midway = smoke_sweep.midway
    assert midway is not None
    assert midway.running, f"no trial the view selects ({midway.filter}) was running when the page opened"
    for name in midway.shown:  # every trial the view selected mid-sweep, the running ones included
        assert name in midway.body, (name, midway.body[:3000])
    arm = midway.running[0].split("-search-")[0].split("-compare-")[0]
    assert f"Group: {arm}" in midway.body
    assert re.search(r"quickstart-\d{8}-\d{6}: running: ", midway.body)  # the description says what runs


@needs_browser
def test_the_printed_link_opens_on_the_answer_and_the_traces_grouped_and_coloured_by_arm(smoke_sweep, ui, chromium):
    assert ui_features()["saved_view"], "the installed MLflow is not one whose saved view was verified"
    link = printed_link(smoke_sweep.stdout)
    page = open_link(chromium, ui.wait(), link, "mlflow_ui_view.png", r"^no arm differs from static at n=1")
    try:
        for arm in ARMS:
            page.get_by_text(f"Group: {arm}", exact=True).wait_for(state="visible")
        # every compare trial drawn in the window chart, one stroke colour per arm
        strokes = page.wait_for_function(
            """(n) => {
                const plots = [...document.querySelectorAll('.js-plotly-plot')];
                const colours = plots.slice(0, 2).map(p => new Set([...p.querySelectorAll('path.js-line')]
                    .map(l => getComputedStyle(l).stroke)));
                return colours.length == 2 && colours.every(c => c.size >= n) ? colours.map(c => [...c]) : null;
            }""", arg=len(ARMS), timeout=240_000).json_value()
        body = page.inner_text("body")
    finally:
        page.close()
    assert "Group by: metalearner.arm" in body
    assert "window" in body and "rope_base" in body
    reader = TrackingReader(smoke_sweep.uri)
    arm_colours = {t.data.tags[RUN_COLOR_TAG] for t in reader.trials(reader.find_sweep("quickstart").info.run_id)
                   if t.data.tags["metalearner.phase"] == "compare"}

    def rgb(hex_colour: str) -> str:
        r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return f"rgb({r}, {g}, {b})"

    for chart in strokes:  # window and rope_base: the lines are drawn in the arms' colours
        assert {rgb(c) for c in arm_colours} <= set(chart), (chart, arm_colours)


@needs_browser
def test_a_pbt_sweeps_link_shows_its_population_and_the_settings_pbt_moved(pbt_sweep, ui, chromium):
    link = pbt_sweep.start_link
    assert link == printed_link(pbt_sweep.stdout)
    pid = parent_of(pbt_sweep.stdout)
    hits = assert_view_finds_runs(pbt_sweep.uri, pid, searched=True)
    assert len(hits) == 2 and {r.data.tags["metalearner.phase"] for r in hits} == {"search"}
    page = open_link(chromium, ui.wait(), link, "mlflow_ui_pbt.png", r"^no comparison: search trials only")
    try:
        page.get_by_text("Group: tuned", exact=True).wait_for(state="visible")
        page.get_by_text(re.compile("^" + re.escape(SETTINGS_SECTION[:20]))).first.wait_for(state="visible")
        body = page.inner_text("body")
    finally:
        page.close()
    for r in hits:  # the population's trials are on the page
        assert r.info.run_name in body, r.info.run_name
    assert "controller.factor" in body
