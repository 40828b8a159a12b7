"""Online controllers: policies that move the knobs from the training loss.

Plain Python floats only (no torch), so a controller behaves identically inside our
PyTorch loop, the Hugging Face Trainer callback and a Ray Tune trial.

Protocol (see DESIGN.md): ``observe(step, loss)`` is called once per optimizer step with
that step's training loss and returns the knobs for the NEXT step; ``state_dict`` /
``load_state_dict`` give exact resume. ``state_dict`` holds only *state* (running loss,
continuous knob values, counters), never the *settings* (factor, beta, ...): a restored
controller keeps the settings it was built with, so a PBT perturbation of ``factor``
takes effect at once instead of being undone by the checkpoint.

To add a policy: write a class with the same constructor shape
(``init: Knobs, **settings``), give it a ``PARAMS`` table and register it in
``CONTROLLERS``; or, outside this package, subclass `BaseController` and name it by its
import path (``controller.name: my_pkg.policies:MyPolicy``) or by an entry point in the
group ``metalearner.controllers``. `metalearner.registry` turns any name into its class
(loading and checking a plugin) and builds a controller by name, so that a plugin is
treated exactly as a built-in policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from metalearner.knobs import Knobs


@runtime_checkable
class Controller(Protocol):
    """What the train loop needs from a policy."""

    name: str

    @property
    def knobs(self) -> Knobs: ...

    @property
    def loss_ewma(self) -> float | None: ...

    def observe(self, step: int, loss: float) -> Knobs: ...

    def settings(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------- validation helpers


@dataclass(frozen=True)
class Param:
    """One controller setting: its default and the check it must pass."""

    default: Any
    check: Callable[[Any], bool]
    expected: str
    kind: type = float


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


REQUIRED = object()

# the bounds every policy accepts; their defaults are defined here and only here
BOUND_PARAMS: dict[str, Param] = {
    "min_window": Param(1, lambda v: _is_int(v) and v >= 1, "an int >= 1", int),
    "max_window": Param(2**20, lambda v: _is_int(v) and v >= 1, "an int >= 1", int),
    "min_base": Param(2.0, lambda v: _is_num(v) and v > 1, "a float > 1"),
    "max_base": Param(1e12, lambda v: _is_num(v) and v > 1, "a float > 1"),
}
_FACTOR = Param(1.005, lambda v: _is_num(v) and v > 1, "a float > 1")
_OPT_FACTOR = Param(None, lambda v: v is None or (_is_num(v) and v > 1), "a float > 1 (or null)")
_BETA = Param(0.9, lambda v: _is_num(v) and 0 <= v < 1, "a float in [0, 1)")
_THRESHOLD = Param(0.01, lambda v: _is_num(v) and v >= 0, "a float >= 0")
_THRESHOLD_MODE = Param("abs", lambda v: v in ("abs", "rel"), "'abs' or 'rel'", str)


def check_setting(key: str, p: Param, v: Any) -> Any:
    """``v`` as setting ``key`` of table entry ``p``: an int where a float is declared becomes
    a float (and a whole float an int where an int is declared), then ``p.check`` must pass.

    Args:
        key: the setting's name (for the message).
        p: its `Param`.
        v: the value given (or the default).
    Returns:
        The converted value.
    Raises:
        ValueError: ``"<key>: got <v>, expected <p.expected>"`` (a check that raises fails too).
    """
    if p.kind is float and _is_int(v):
        v = float(v)
    if p.kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    try:
        ok = bool(p.check(v))
    except Exception:  # noqa: BLE001 - a check that cannot judge the value (a plugin's) rejects it
        ok = False
    if not ok:
        raise ValueError(f"{key}: got {v!r}, expected {p.expected}")
    return v


def resolve_settings(name: str, table: dict[str, Param], given: dict[str, Any]) -> dict[str, Any]:
    """Validate ``given`` against ``table`` (the policy ``name``'s) and fill defaults.

    Raises:
        ValueError: naming the field: unknown, missing, failing its check, or bounds reversed.
    """
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise ValueError(
            f"{unknown[0]}: unknown parameter for controller '{name}'; "
            f"expected one of {sorted(table)}"
        )
    out: dict[str, Any] = {}
    for key, p in table.items():
        v = given.get(key, p.default)
        if v is REQUIRED:
            raise ValueError(f"{key}: missing, required by controller '{name}' ({p.expected})")
        out[key] = check_setting(key, p, v)
    if out["min_window"] > out["max_window"]:
        raise ValueError(
            f"max_window: got {out['max_window']}, expected >= min_window ({out['min_window']})"
        )
    if out["min_base"] > out["max_base"]:
        raise ValueError(
            f"max_base: got {out['max_base']}, expected >= min_base ({out['min_base']})"
        )
    return out


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _round_window(w: float) -> int:
    return int(math.floor(w + 0.5))


# ---------------------------------------------------------------- shared base


class BaseController:
    """Bookkeeping shared by every policy: settings, bounds, continuous knob values.

    A policy (built in or a plugin) sets ``name`` and ``PARAMS`` and overrides `update`,
    moving the knobs with `scale`; state of its own goes into `state_dict` /
    `load_state_dict` (call ``super()``), its settings are `settings()`. The bounds
    (`BOUND_PARAMS`) are checked and applied here.
    """

    name = "base"
    PARAMS: dict[str, Param] = {}

    def __init__(self, init: Knobs, **settings: Any) -> None:
        if not isinstance(init, Knobs):
            raise ValueError(f"init: got {init!r}, expected a Knobs instance")
        self._settings = resolve_settings(self.name, {**self.PARAMS, **BOUND_PARAMS}, settings)
        s = self._settings
        self.init = init
        self._base_f = _clamp(float(init.rope_base), s["min_base"], s["max_base"])
        self._window_f = _clamp(float(init.window), s["min_window"], s["max_window"])
        self._knobs = self._make_knobs()
        self.nonfinite = 0
        self.last_step = 0

    # -- public surface
    @property
    def knobs(self) -> Knobs:
        return self._knobs

    @property
    def loss_ewma(self) -> float | None:
        return None

    def settings(self) -> dict[str, Any]:
        """The resolved settings (defaults filled in), for logging."""
        return dict(self._settings)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_f": self._base_f,
            "window_f": self._window_f,
            "nonfinite": self.nonfinite,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"state_dict: got state of controller {state.get('name')!r}, expected {self.name!r}"
            )
        s = self._settings
        self._base_f = _clamp(float(state["base_f"]), s["min_base"], s["max_base"])
        self._window_f = _clamp(float(state["window_f"]), s["min_window"], s["max_window"])
        self.nonfinite = int(state["nonfinite"])
        self.last_step = int(state["last_step"])
        self._knobs = self._make_knobs()

    def observe(self, step: int, loss: float) -> Knobs:
        self.last_step = int(step)
        loss = float(loss)
        if not math.isfinite(loss):
            self.nonfinite += 1
            return self._knobs
        self.update(step, loss)
        return self._knobs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings}, knobs={self._knobs})"

    # -- for subclasses
    def update(self, step: int, loss: float) -> None:
        """Move the knobs from one finite training loss (`observe` counts non-finite ones)."""

    def scale(self, m_base: float, m_window: float) -> None:
        """Multiply the continuous base and window by ``m_base`` / ``m_window``, clamped to
        the bounds; the knobs are the window rounded to the nearest int."""
        s = self._settings
        self._base_f = _clamp(self._base_f * m_base, s["min_base"], s["max_base"])
        self._window_f = _clamp(self._window_f * m_window, s["min_window"], s["max_window"])
        self._knobs = self._make_knobs()

    def _make_knobs(self) -> Knobs:
        return Knobs(rope_base=self._base_f, window=max(1, _round_window(self._window_f)))


# ---------------------------------------------------------------- policies


class StaticController(BaseController):
    """Never moves the knobs: the baseline every policy is compared with."""

    name = "static"
    PARAMS: dict[str, Param] = {}


class EWMAController(BaseController):
    """The seed's rule, corrected (DESIGN.md).

    Keeps an EWMA of the loss. When the loss falls below it by more than ``threshold``
    both knobs grow by their factor; when it rises above it by more than ``threshold``
    they shrink; otherwise they stay. One EWMA update per step; the window's continuous
    value is kept so that small factors accumulate instead of rounding away.

    Example:
        >>> from metalearner import Knobs, build_controller
        >>> c = build_controller("ewma", init=Knobs(10_000.0, 40), factor=1.1, beta=0.5,
        ...                      threshold=0.0)
        >>> c.observe(1, 3.0).window, c.observe(2, 1.0).window   # first step seeds the EWMA
        (40, 44)
    """

    name = "ewma"
    PARAMS = {
        "factor": _FACTOR,
        "base_factor": _OPT_FACTOR,
        "window_factor": _OPT_FACTOR,
        "beta": _BETA,
        "threshold": _THRESHOLD,
        "threshold_mode": _THRESHOLD_MODE,
    }

    def __init__(self, init: Knobs, **settings: Any) -> None:
        super().__init__(init, **settings)
        s = self._settings
        self._fb = s["base_factor"] if s["base_factor"] is not None else s["factor"]
        self._fw = s["window_factor"] if s["window_factor"] is not None else s["factor"]
        self._running: float | None = None

    @property
    def loss_ewma(self) -> float | None:
        return self._running

    def update(self, step: int, loss: float) -> None:
        s = self._settings
        beta = s["beta"]
        self._running = loss if self._running is None else beta * self._running + (1 - beta) * loss
        change = loss - self._running
        thr = s["threshold"] * abs(self._running) if s["threshold_mode"] == "rel" else s["threshold"]
        if change < -thr:
            self.scale(self._fb, self._fw)
        elif change > thr:
            self.scale(1.0 / self._fb, 1.0 / self._fw)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "running": self._running}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._running = None if state["running"] is None else float(state["running"])


class ScheduleController(BaseController):
    """Warms the window (and optionally the base, geometrically) up over ``warmup_steps``.

    ``shape`` is ``linear`` or ``cubic`` (4x^3 - 6x^2 + 3x). Ignores the loss. After
    ``observe(step, ...)`` the knobs are those of progress ``min(step / warmup_steps, 1)``.
    """

    name = "schedule"
    PARAMS = {
        "final_window": Param(REQUIRED, lambda v: _is_int(v) and v >= 1, "an int >= 1", int),
        "final_base": Param(None, lambda v: v is None or (_is_num(v) and v > 1), "a float > 1 (or null)"),
        "warmup_steps": Param(REQUIRED, lambda v: _is_int(v) and v >= 1, "an int >= 1", int),
        "shape": Param("linear", lambda v: v in ("linear", "cubic"), "'linear' or 'cubic'", str),
    }

    def __init__(self, init: Knobs, **settings: Any) -> None:
        super().__init__(init, **settings)
        self._w0 = self._window_f
        self._b0 = self._base_f

    def _progress(self, step: int) -> float:
        x = min(max(step / self._settings["warmup_steps"], 0.0), 1.0)
        if self._settings["shape"] == "cubic":
            return 4 * x**3 - 6 * x**2 + 3 * x
        return x

    def update(self, step: int, loss: float) -> None:
        s = self._settings
        p = self._progress(step)
        w = self._w0 + (s["final_window"] - self._w0) * p
        b = self._b0 if s["final_base"] is None else self._b0 * (s["final_base"] / self._b0) ** p
        self._base_f = _clamp(b, s["min_base"], s["max_base"])
        self._window_f = _clamp(w, s["min_window"], s["max_window"])
        self._knobs = self._make_knobs()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "w0": self._w0, "b0": self._b0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._w0, self._b0 = float(state["w0"]), float(state["b0"])


class PlateauController(BaseController):
    """"Expand when stuck": grow both knobs by ``factor`` when the (smoothed) loss has not
    improved on its best by ``threshold`` for ``patience`` steps, then wait ``cooldown``
    steps. ReduceLROnPlateau's bookkeeping; ``beta`` smooths the loss first (0 = raw).
    """

    name = "plateau"
    PARAMS = {
        "factor": Param(1.1, lambda v: _is_num(v) and v > 1, "a float > 1"),
        "beta": _BETA,
        "threshold": _THRESHOLD,
        "threshold_mode": _THRESHOLD_MODE,
        "patience": Param(20, lambda v: _is_int(v) and v >= 1, "an int >= 1", int),
        "cooldown": Param(20, lambda v: _is_int(v) and v >= 0, "an int >= 0", int),
    }

    def __init__(self, init: Knobs, **settings: Any) -> None:
        super().__init__(init, **settings)
        self._running: float | None = None
        self._best = math.inf
        self._num_bad = 0
        self._cooldown_left = 0

    @property
    def loss_ewma(self) -> float | None:
        return self._running

    def update(self, step: int, loss: float) -> None:
        s = self._settings
        beta = s["beta"]
        self._running = loss if self._running is None else beta * self._running + (1 - beta) * loss
        cur = self._running
        if s["threshold_mode"] == "rel":
            improved = cur < self._best * (1 - s["threshold"])
        else:
            improved = cur < self._best - s["threshold"]
        if improved:
            self._best = cur
            self._num_bad = 0
        else:
            self._num_bad += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._num_bad = 0
        if self._num_bad >= s["patience"]:
            self.scale(s["factor"], s["factor"])
            self._cooldown_left = s["cooldown"]
            self._num_bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "running": self._running,
            "best": self._best,
            "num_bad": self._num_bad,
            "cooldown_left": self._cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._running = None if state["running"] is None else float(state["running"])
        self._best = float(state["best"])
        self._num_bad = int(state["num_bad"])
        self._cooldown_left = int(state["cooldown_left"])


CONTROLLERS: dict[str, Callable[..., Controller]] = {
    "static": StaticController,
    "schedule": ScheduleController,
    "ewma": EWMAController,
    "plateau": PlateauController,
}
