"""A PBT/PB2 perturbation as the trial that received it records it: one record, written as
run tags by the sweep's callback (`trainables.callback`) and read back by the report
(`metalearner.report.runs`).

A perturbation (an "exploit" followed by an "explore") replaces a population member's
weights and controller state with another member's checkpoint (the *donor*) and changes
its settings. The receiving trial's child run gets:

- tag ``metalearner.perturb.N`` (the N-th perturbation, from 1): one readable line,
  ``at step 11: from trial 3f2a1_00001 (run 9c0e...) at its step 10; controller.factor
  1.06297 → 1.0012, controller.beta 0.9 → 0.95`` (the first step run with the new
  settings; the donor's trial id, MLflow run id and the step of the checkpoint copied;
  each setting old → new, ``?`` for an old value the driver did not see);
- tag ``metalearner.perturbations``: how many so far;
- a line in its description (`Perturbation.note`).

The params of such a trial hold its initial settings, the metrics ``controller.*`` the
settings in force at each step (`population_note`). Imports nothing of MLflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

PERTURB_TAG = "metalearner.perturb."  # + N: the N-th perturbation of a trial (1, 2, ...)
PERTURBATIONS_TAG = "metalearner.perturbations"  # how many a trial received
UNKNOWN = "?"  # a donor run id or an old value that was not known when the record was made

_LINE = re.compile(r"at step (\d+): from trial (\S+) \(run (\S+)\) at its step (\d+); (.*)")
_CHANGE = re.compile(r"(\S+) (\S+) → (\S+)")


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return UNKNOWN
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else format(float(v), ".6g")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation of a population member.

    Attributes:
        step: the first step the member ran with the new settings (and the donor's weights).
        donor_trial: the Tune trial id of the member whose checkpoint was copied.
        donor_run: that member's MLflow run id (`UNKNOWN` if it was not in the store yet).
        donor_step: the donor's step whose checkpoint was copied.
        settings: ``(key, old, new)`` per setting the scheduler may change (dotted keys,
            ``controller.factor``); ``old`` is None when not known.
    """

    step: int
    donor_trial: str
    donor_run: str
    donor_step: int
    settings: tuple[tuple[str, float | None, float], ...]

    def text(self) -> str:
        """The tag value: one line (see the module docstring), read back by `parse`."""
        changes = ", ".join(f"{k} {_num(old)} → {_num(new)}" for k, old, new in self.settings) or "no settings"
        return (f"at step {self.step}: from trial {self.donor_trial} (run {self.donor_run or UNKNOWN}) "
                f"at its step {self.donor_step}; {changes}")

    @classmethod
    def parse(cls, text: str) -> Perturbation:
        """A tag value back to a `Perturbation` (values to 6 significant digits).

        Raises:
            ValueError: ``text`` is not a perturbation line.
        """
        m = _LINE.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"not a perturbation record: {text!r}")
        settings = []
        for part in m.group(5).split(", "):
            c = _CHANGE.fullmatch(part)
            if c is not None:
                old = None if c.group(2) == UNKNOWN else float(c.group(2))
                settings.append((c.group(1), old, float(c.group(3))))
        return cls(int(m.group(1)), m.group(2), m.group(3), int(m.group(4)), tuple(settings))

    def note(self, scheduler: str = "") -> str:
        """The line appended to the receiving run's description (markdown)."""
        changes = ", ".join(f"`{k}` {_num(old)} → {_num(new)}" for k, old, new in self.settings)
        who = f"{scheduler.upper()} perturbation" if scheduler else "Perturbation"
        return (f"**{who} at step {self.step}**: copied the weights of trial `{self.donor_trial}` "
                f"(run `{self.donor_run or UNKNOWN}`) at its step {self.donor_step}"
                + (f"; {changes}." if changes else "."))


def perturbation_tags(n: int, p: Perturbation) -> dict[str, str]:
    """The tags that record ``p`` as the ``n``-th perturbation of a run."""
    return {f"{PERTURB_TAG}{n}": p.text(), PERTURBATIONS_TAG: str(n)}


def perturbations_in(tags: Mapping[str, str]) -> list[Perturbation]:
    """The perturbations a run's tags record, in order (unreadable values are skipped)."""
    found = []
    for name, value in tags.items():
        if name.startswith(PERTURB_TAG) and name[len(PERTURB_TAG):].isdigit():
            try:
                found.append((int(name[len(PERTURB_TAG):]), Perturbation.parse(value)))
            except ValueError:
                continue
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def population_note(scheduler: str) -> str:
    """The description a population member starts with: what its params and metrics mean."""
    return (f"Population-based training ({scheduler.upper() or 'PBT'}): the params `controller.*` hold this "
            "trial's **initial** settings; the metrics `controller.*` hold the settings in force at each step "
            "(a step function). Each perturbation is listed below and in the tags `metalearner.perturb.N`.")
