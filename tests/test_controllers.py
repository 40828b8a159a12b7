"""Controllers: the seed's corrected rule reproduced exactly, validation, exact resume."""

import math
import random

import pytest

from metalearner import CONTROLLERS, Knobs, build_controller

K0 = Knobs(rope_base=10_000.0, window=40)


def reference_ewma(losses, k0, factor, beta, threshold, bounds=(1, 2**20, 2.0, 1e12)):
    """DESIGN.md's pseudo-code, transcribed line by line."""
    min_w, max_w, min_b, max_b = bounds
    running, base_f, window_f, out = None, k0.rope_base, float(k0.window), []
    for loss in losses:
        if not math.isfinite(loss):
            out.append(out[-1] if out else (base_f, int(math.floor(window_f + 0.5))))
            continue
        running = loss if running is None else beta * running + (1 - beta) * loss
        change = loss - running
        m = factor if change < -threshold else 1 / factor if change > threshold else 1
        base_f = min(max(base_f * m, min_b), max_b)
        window_f = min(max(window_f * m, min_w), max_w)
        out.append((base_f, int(math.floor(window_f + 0.5))))
    return out


def test_ewma_reproduces_the_design_rule_exactly():
    rng = random.Random(0)
    losses = [3.0 * math.exp(-i / 200) + rng.gauss(0, 0.05) for i in range(500)]
    c = build_controller("ewma", init=K0, factor=1.01, beta=0.9, threshold=0.01)
    got = [(k.rope_base, k.window) for k in (c.observe(s, x) for s, x in enumerate(losses, 1))]
    assert got == reference_ewma(losses, K0, 1.01, 0.9, 0.01)
    assert len({w for _, w in got}) > 5  # the knobs really moved


def test_small_factor_accumulates_instead_of_rounding_away():
    c = build_controller("ewma", init=Knobs(10_000.0, 10), factor=1.01, beta=0.5, threshold=0.0)
    loss = 10.0
    for s in range(1, 200):
        loss *= 0.9
        k = c.observe(s, loss)
    assert k.window > 10  # 1.01 * 10 = 10.1 rounds to 10 every step unless the float is kept


def test_one_ewma_update_per_step():
    c = build_controller("ewma", init=K0, factor=1.1, beta=0.5, threshold=0.0)
    c.observe(1, 4.0)
    c.observe(2, 2.0)
    assert c.loss_ewma == pytest.approx(3.0)  # two updates would give 2.5


def test_grow_and_shrink_directions_and_threshold_band():
    c = build_controller("ewma", init=K0, factor=1.5, beta=0.5, threshold=0.1)
    c.observe(1, 1.0)
    assert c.observe(2, 1.05).window == 40  # within the band: no move
    k = c.observe(3, 0.5)  # well below the running loss: grow
    assert k.window == 60 and k.rope_base == pytest.approx(15_000.0)
    k = c.observe(4, 5.0)  # well above: shrink
    assert k.window == 40


def test_relative_threshold_and_separate_factors():
    c = build_controller("ewma", init=K0, factor=1.2, base_factor=2.0, beta=0.5, threshold=0.5,
                         threshold_mode="rel")
    c.observe(1, 10.0)
    assert c.observe(2, 7.0).window == 40  # change -1.5 within 0.5*8.5
    k = c.observe(3, 1.0)
    assert k.rope_base == pytest.approx(20_000.0) and k.window == 48


def test_bounds_clamp_both_knobs():
    c = build_controller("ewma", init=K0, factor=2.0, beta=0.9, threshold=0.0, max_window=64,
                         max_base=30_000.0, min_window=8, min_base=5_000.0)
    for s, loss in enumerate([10, 5, 2, 1, 0.5, 0.1], 1):
        k = c.observe(s, loss)
    assert k.window == 64 and k.rope_base == 30_000.0
    for s, loss in enumerate([100, 1000, 10_000, 1e5, 1e6, 1e7, 1e8], 10):
        k = c.observe(s, loss)
    assert k.window == 8 and k.rope_base == 5_000.0


def test_nonfinite_losses_are_counted_and_never_poison_the_ewma():
    c = build_controller("ewma", init=K0, factor=1.1, beta=0.9, threshold=0.0)
    c.observe(1, 2.0)
    before = (c.knobs, c.loss_ewma)
    for s, bad in enumerate([float("nan"), float("inf"), -float("inf")], 2):
        assert c.observe(s, bad) == before[0]
    assert (c.knobs, c.loss_ewma) == before
    assert c.nonfinite == 3
    c.observe(5, 1.0)
    assert math.isfinite(c.loss_ewma)


@pytest.mark.parametrize("name,settings", [
    ("static", {}),
    ("ewma", {"factor": 1.05, "beta": 0.8, "threshold": 0.0}),
    ("schedule", {"final_window": 128, "final_base": 50_000.0, "warmup_steps": 50, "shape": "cubic"}),
    ("plateau", {"factor": 1.2, "patience": 3, "cooldown": 2, "threshold": 0.05}),
])
def test_state_dict_gives_exact_resume(name, settings):
    rng = random.Random(1)
    losses = [2.0 + rng.gauss(0, 0.3) for _ in range(120)]
    a = build_controller(name, init=K0, **settings)
    straight = [a.observe(s, x) for s, x in enumerate(losses, 1)]
    b = build_controller(name, init=K0, **settings)
    first = [b.observe(s, x) for s, x in enumerate(losses[:60], 1)]
    c = build_controller(name, init=K0, **settings)
    c.load_state_dict(b.state_dict())
    second = [c.observe(s, x) for s, x in enumerate(losses[60:], 61)]
    assert first + second == straight


def test_state_dict_holds_state_not_settings():
    """A PBT perturbation of the factor must survive loading the donor's state."""
    a = build_controller("ewma", init=K0, factor=1.01, beta=0.9, threshold=0.0)
    for s, x in enumerate([3.0, 2.0, 1.0], 1):
        a.observe(s, x)
    b = build_controller("ewma", init=K0, factor=1.5, beta=0.9, threshold=0.0)
    b.load_state_dict(a.state_dict())
    assert b.settings()["factor"] == 1.5
    w = b.knobs.window
    assert b.observe(4, 0.1).window == math.floor(a._window_f * 1.5 + 0.5) and w != b.knobs.window


def test_static_never_moves():
    c = build_controller("static", init=K0)
    for s, x in enumerate([5.0, 1.0, 10.0, 0.1], 1):
        assert c.observe(s, x) == K0


@pytest.mark.parametrize("shape", ["linear", "cubic"])
def test_schedule_warms_window_up(shape):
    c = build_controller("schedule", init=Knobs(10_000.0, 16), final_window=116, warmup_steps=100, shape=shape,
                         final_base=40_000.0)
    ws = [c.observe(s, 1.0).window for s in range(1, 151)]
    assert ws[-1] == 116 and ws[99] == 116 and ws == sorted(ws)
    assert c.knobs.rope_base == pytest.approx(40_000.0)
    x = 0.5
    expected = 16 + 100 * (x if shape == "linear" else 4 * x**3 - 6 * x**2 + 3 * x)
    assert ws[49] == math.floor(expected + 0.5)


def test_plateau_expands_when_stuck_then_cools_down():
    c = build_controller("plateau", init=K0, factor=2.0, beta=0.0, threshold=0.0, patience=3, cooldown=2)
    windows = [c.observe(s, 1.0).window for s in range(1, 12)]
    # step 1 sets best; steps 2,3,4 are bad -> grow at 4; cooldown 2 steps; bad again 7,8,9 -> grow at 9
    assert windows == [40, 40, 40, 80, 80, 80, 80, 80, 160, 160, 160]


@pytest.mark.parametrize("name,settings,field", [
    ("ewma", {"factor": 1.0}, "factor"),
    ("ewma", {"factor": 0.9}, "factor"),
    ("ewma", {"beta": 1.0}, "beta"),
    ("ewma", {"beta": -0.1}, "beta"),
    ("ewma", {"threshold": -1e-3}, "threshold"),
    ("ewma", {"threshold_mode": "pct"}, "threshold_mode"),
    ("ewma", {"min_window": 10, "max_window": 5}, "max_window"),
    ("ewma", {"min_base": 0.5}, "min_base"),
    ("ewma", {"speed": 2}, "speed"),
    ("plateau", {"patience": 0}, "patience"),
    ("schedule", {"warmup_steps": 10}, "final_window"),
    ("static", {"factor": 1.1}, "factor"),
])
def test_invalid_settings_name_the_field(name, settings, field):
    with pytest.raises(ValueError) as e:
        build_controller(name, init=K0, **settings)
    assert str(e.value).startswith(field)


def test_unknown_controller_lists_the_known_ones():
    with pytest.raises(ValueError, match="ewma"):
        build_controller("pid", init=K0)
    assert set(CONTROLLERS) == {"static", "schedule", "ewma", "plateau"}


def test_knobs_validate():
    with pytest.raises(ValueError, match="window"):
        Knobs(10_000.0, 0)
    with pytest.raises(ValueError, match="window"):
        Knobs(10_000.0, 3.5)
    with pytest.raises(ValueError, match="rope_base"):
        Knobs(float("nan"), 4)
