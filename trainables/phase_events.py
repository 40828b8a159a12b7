"""A phase's events for the sweep: the Tune callback that tells when its first trial starts.

`trainables.phase_runner.PhaseRunner` adds it to each phase's Tuner (after the trace
callback, so the trial's child run is journaled by then); the sweep switches the saved
view to the comparison's trials at that moment, not before (`metalearner.report.live`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune import Callback


class FirstTrialStarted(Callback):
    """Calls ``hook()`` once, when the first trial of the Tune run starts (also a restored
    run's first restarted trial).

    Args:
        hook: called with no arguments, in Tune's event loop on the driver.
    """

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook: Callable[[], None] | None = hook
        self.fired = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included); the hook stays with the driver
        return {**self.__dict__, "hook": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self.fired and self.hook is not None:
            self.fired = True
            self.hook()
