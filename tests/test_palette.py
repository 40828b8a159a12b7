"""One palette: an arm has the same colour in the MLflow UI (``mlflow.runColor``), in every
report plot, in the terminal table and in the live progress display, and plot legends
name arms. The UI's colours are `metalearner.tracking.ui`'s; the plots are drawn for real
(matplotlib, Agg) and read back from the figures they save."""

import colorsys
import io
from types import SimpleNamespace

import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from rich.console import Console

from metalearner.report.plots import plot_traces
from metalearner.report.render import paint_arms
from metalearner.report.runs import arm_palette, perturbation_events
from metalearner.tracking import SEARCH_GREY, arm_colours, run_colour
from metalearner.tracking.lineage import Perturbation
from metalearner.tracking.ui import sweep_arm_colours
from trainables.progress import ProgressTable

# the spec's order; name order would be ewma-pbt, ewma-seed, schedule, static (the old plots' order)
ORDER = ["static", "schedule", "ewma-seed", "ewma-pbt"]
STEPS = 12


def ansi(colour):
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"\x1b[38;2;{r};{g};{b}m"


def test_the_sweeps_palette_is_the_uis():
    ui = arm_colours(ORDER)  # what SweepRunner tags the runs with (the spec's order)
    palette = sweep_arm_colours(",".join(ORDER), ["ewma-pbt", "static", "zz-unlisted"])  # as the report reads it
    assert {a: palette[a] for a in ORDER} == ui and palette["zz-unlisted"] not in (SEARCH_GREY, *ui.values())
    assert sweep_arm_colours(ORDER) == ui  # a sequence works as the tag does
    # a population's members are the arm's result: its colour; a searcher's candidates: grey
    assert run_colour("ewma-pbt", "search", ui, population=True) == ui["ewma-pbt"]
    assert run_colour("ewma-pbt", "search", ui) == SEARCH_GREY
    assert run_colour("static", "compare", ui, population=True) == ui["static"]


@pytest.fixture(scope="module")
def sweep_frames():
    """A sweep as `load_traces` returns it: 3 compare arms, 2 searched ewma-seed trials, and a
    population of 2 ewma-pbt members (one perturbed at step 7 from the other's step 6)."""
    palette = sweep_arm_colours(",".join(ORDER), ORDER)
    runs, traces = [], []

    def add(rid, arm, phase, factor=None, perturbations=(), settings=None):
        runs.append({"run_id": rid, "run_name": f"{arm}-{phase}-{rid}", "arm": arm, "phase": phase, "seed": 0,
                     "seq_len": 64.0, "n_heads": 4.0, "n_global_heads": 1.0, "train_steps": float(STEPS),
                     "trial_id": f"t_{rid}", "colour": palette[arm], "perturbations": tuple(perturbations),
                     "controller.factor": None if factor is None else str(factor)})
        for s in range(1, STEPS + 1):
            traces.extend([(rid, s, "loss", 3.0 - 0.1 * s - 0.01 * len(runs)), (rid, s, "window", 8.0 + s % 3),
                           (rid, s, "rope_base", 1e4 * (1 + 0.01 * s))])
            if s % 4 == 0:
                traces.append((rid, s, "val_loss", 2.5 - 0.05 * s - 0.01 * len(runs)))
        for s, values in (settings or {}).items():
            traces.extend((rid, s, k, v) for k, v in values.items())

    for arm in ("static", "schedule"):
        add(f"{arm}0", arm, "compare")
    add("seed0", "ewma-seed", "compare", factor=1.01)
    add("seedA", "ewma-seed", "search", factor=1.01)
    add("seedB", "ewma-seed", "search", factor=1.05)
    jump = Perturbation(step=7, donor_trial="t_pbtB", donor_run="b" * 32, donor_step=6,
                        settings=(("controller.factor", 1.08, 1.02),))
    add("pbtA", "ewma-pbt", "search", factor=1.08, perturbations=[jump],
        settings={1: {"controller.factor": 1.08}, 4: {"controller.factor": 1.08}, 6: {"controller.factor": 1.08},
                  7: {"controller.factor": 1.02}, 12: {"controller.factor": 1.02}})
    add("pbtB", "ewma-pbt", "search", factor=1.03,
        settings={s: {"controller.factor": 1.03} for s in (1, 4, 8, 12)})
    return pd.DataFrame(runs), pd.DataFrame(traces, columns=["run_id", "step", "key", "value"])


@pytest.fixture(scope="module")
def figures(sweep_frames, tmp_path_factory):
    """file name -> the matplotlib figure `plot_traces` saved to it."""
    saved = {}
    original = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved[str(path).rsplit("/", 1)[-1]] = fig
        return original(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", keep)
        written = plot_traces(*sweep_frames, tmp_path_factory.mktemp("plots"))
    assert sorted(p.name for p in written) == sorted(saved) == sorted(
        ["rope_base.png", "window.png", "loss.png", "search.png", "lineage.png"])
    return saved


def legend_colours(fig):
    """label -> colour of each legend entry of the figure's axes."""
    out = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True):
            colour = handle.get_color() if hasattr(handle, "get_color") else handle.get_facecolor()[0]
            out[text.get_text()] = to_hex(colour)
    return out


def test_every_plot_draws_an_arm_in_its_ui_colour_and_names_it(figures, sweep_frames):
    ui = arm_colours(ORDER)
    assert arm_palette(sweep_frames[0]) == ui
    compared = ORDER[:3]  # the knob and loss plots draw the comparison runs
    for name in ("window.png", "rope_base.png"):  # legends name arms, in the UI's colours
        legend = legend_colours(figures[name])
        assert {k: v for k, v in legend.items() if k != "seq_len"} == {a: ui[a] for a in compared}, name
    legend = legend_colours(figures["loss.png"])
    assert all(legend[f"{a} train"] == legend[f"{a} val"] == ui[a] for a in compared)
    assert legend_colours(figures["search.png"]) == {"ewma-pbt": ui["ewma-pbt"], "ewma-seed": ui["ewma-seed"]}


def test_the_lineage_plot_shades_the_arms_colour_and_marks_each_perturbation(figures):
    fig = figures["lineage.png"]
    axes = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in axes] == ["factor", "window"]  # each setting in force, then the knob
    hue = colorsys.rgb_to_hsv(*to_rgb(arm_colours(ORDER)["ewma-pbt"]))[0]
    legend = legend_colours(fig)
    assert sorted(legend) == ["trial t_pbtA", "trial t_pbtB"]  # members are named by trial
    for colour in legend.values():  # shades of the arm's colour
        assert colorsys.rgb_to_hsv(*to_rgb(colour))[0] == pytest.approx(hue, abs=0.02)
    for ax in fig.axes:  # the jump: a line just before the first step with the new settings
        assert any(list(line.get_xdata()) == [6.5, 6.5] for line in ax.get_lines())
    factor = axes[0]
    steps = [line for line in factor.get_lines() if line.get_label() == "trial t_pbtA"][0]
    assert steps.get_drawstyle() == "steps-post"  # the settings in force are a step function
    (strip,) = [ax for ax in fig.axes if ax.texts]
    assert [t.get_text() for t in strip.texts] == ["step 7: t_pbtA ← trial t_pbtB"]  # the donor, named


def test_the_report_reads_perturbations_back(sweep_frames):
    events = perturbation_events(sweep_frames[0])
    assert events.to_dict("records") == [{"run_id": "pbtA", "n": 1, "step": 7, "donor_trial": "t_pbtB",
                                          "donor_run": "b" * 32, "donor_step": 6, "key": "controller.factor",
                                          "old": 1.08, "new": 1.02}]
    assert perturbation_events(sweep_frames[0].drop(columns="perturbations")).empty


def test_the_terminal_table_paints_each_arm_in_its_ui_colour():
    ui = arm_colours(["ewma", "ewma-seed", "static"])
    text = ("arm        n  verdict\nstatic     2  baseline\newma-seed  2  no clear difference\newma       2  better\n"
            "ewma-seed vs static: no clear difference\nthe static arm is the baseline")
    painted = paint_arms(text, ui).splitlines()
    assert painted[0] == "arm        n  verdict"
    assert painted[1] == f"{ansi(ui['static'])}static\x1b[0m     2  baseline"
    assert painted[2].startswith(f"{ansi(ui['ewma-seed'])}ewma-seed\x1b[0m")  # the longer name wins
    assert painted[3].startswith(f"{ansi(ui['ewma'])}ewma\x1b[0m ")
    assert painted[4].startswith(f"{ansi(ui['ewma-seed'])}ewma-seed\x1b[0m vs static")
    assert painted[5] == "the static arm is the baseline"  # only a line's first word is an arm
    assert paint_arms(text, {}) == text


def test_the_live_display_shows_each_arm_in_its_ui_colour():
    ui = arm_colours(["static", "ewma"])
    table = ProgressTable(10, "demo", interactive=False)
    table.use_colours(ui)
    for tid, arm in (("t1", "static"), ("t2", "ewma")):
        table.update(SimpleNamespace(trial_id=tid, config={"train": {"seed": 0}, "meta": {"arm": arm}}),
                     "RUNNING", None)
    out = io.StringIO()
    Console(file=out, width=200, color_system="truecolor", force_terminal=True).print(table._table())
    shown = out.getvalue()
    assert ansi(ui["static"])[2:-1] in shown and ansi(ui["ewma"])[2:-1] in shown
