"""An example controller plugin: grow the window when the loss stops falling.

Named in a spec as ``controller.name: grow_on_plateau:GrowOnPlateau`` and shipped to the
Ray workers with ``runtime_env.py_modules`` (see ``experiments/plugin_policy.yaml``).
It follows the `metalearner.controllers.Controller` protocol by subclassing
`BaseController`, and declares its settings in ``PARAMS``, so that validation, search
spaces, PBT and export treat it as a built-in policy.

The rule: keep an EWMA of the loss; every ``patience`` steps compare it with its value
``patience`` steps ago. If it fell by less than ``min_improvement`` (relative), the
model has exhausted its context: grow the window by ``factor`` (and the RoPE base by
``base_factor``, 1 = keep it). Unlike the built-in ``plateau`` it looks at the slope over
a fixed horizon, not at the best loss so far, and it never waits a cooldown.
"""

from __future__ import annotations

import math
from typing import Any

from metalearner.controllers import BaseController, Param


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class GrowOnPlateau(BaseController):
    """Grow the window by ``factor`` each time the EWMA loss improved by less than
    ``min_improvement`` (relative) over the last ``patience`` steps."""

    name = "grow_on_plateau"
    PARAMS = {
        "factor": Param(1.5, lambda v: _number(v) and v > 1, "a float > 1"),
        "base_factor": Param(1.0, lambda v: _number(v) and v >= 1, "a float >= 1"),
        "min_improvement": Param(0.01, lambda v: _number(v) and 0 <= v < 1, "a float in [0, 1)"),
        "patience": Param(10, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                          "an int >= 1", int),
        "beta": Param(0.8, lambda v: _number(v) and 0 <= v < 1, "a float in [0, 1)"),
    }

    def __init__(self, init: Any, **settings: Any) -> None:
        super().__init__(init, **settings)
        self._running: float | None = None
        self._anchor: float | None = None  # the running loss at the start of the current horizon
        self._since = 0  # steps since the anchor

    @property
    def loss_ewma(self) -> float | None:
        return self._running

    def update(self, step: int, loss: float) -> None:
        s = self.settings()
        self._running = loss if self._running is None else s["beta"] * self._running + (1 - s["beta"]) * loss
        if self._anchor is None:
            self._anchor, self._since = self._running, 0
            return
        self._since += 1
        if self._since < s["patience"]:
            return
        if self._running > self._anchor * (1 - s["min_improvement"]):
            self.scale(s["base_factor"], s["factor"])
        self._anchor, self._since = self._running, 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "running": self._running, "anchor": self._anchor, "since": self._since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._running = state["running"]
        self._anchor = state["anchor"]
        self._since = int(state["since"])
