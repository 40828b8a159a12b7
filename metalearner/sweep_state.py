"""The durable state of a sweep: what ``metalearner sweep --resume`` continues from.

One small JSON file in the experiment folder (beside ``experiment.yaml`` and the tracking
journal), rewritten atomically (temporary file, fsync, rename) each time it changes:

- the tracking URI, the storage and the folder stamp (names of the Tune experiments);
- per phase (``search:ARM`` for each searched arm, then ``compare``): its Tune experiment
  folder, whether it finished, and what later phases need (the arm's best controller,
  the failed trials' one-line errors, the full first error of an arm that failed);
- the child run of every trial: phase -> Tune trial id -> its journal run key and config
  key, so that a trial Tune re-creates under a new id (its driver died before Tune saved
  the trial) takes over the run of the vanished one with the same config.

The points themselves are not here: the tracking journal (`metalearner.journal`) holds
each run's last step. Standard library only: the CLI reads this before anything starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "sweep_state.json"
SPEC_FILE = "experiment.yaml"
PARENT_KEY = "sweep"  # the parent run's journal key: a resume reopens it
VERSION = 1


def config_key(config: Any) -> str:
    """A stable text key of a trial config (the same config gives the same key)."""
    return json.dumps(config, sort_keys=True, default=repr)


@dataclass
class SweepState:
    """The state file of one sweep (see the module docstring).

    Args:
        folder: the experiment folder (holds ``experiment.yaml`` and this file).
        data: the file's content.
    """

    folder: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, tracking_uri: str, stamp: str, storage: str) -> SweepState:
        state = cls(Path(folder), {"version": VERSION, "tracking_uri": tracking_uri, "stamp": stamp,
                                   "storage": storage, "phases": {}, "children": {}})
        state.save()
        return state

    @classmethod
    def load(cls, folder: str | Path) -> SweepState:
        """Read ``folder``'s state file.

        Raises:
            ValueError: one line naming ``--resume``, when the folder is not a sweep's.
        """
        path = Path(folder) / STATE_FILE
        if not path.is_file() or not (Path(folder) / SPEC_FILE).is_file():
            raise ValueError(f"--resume: got {str(folder)!r}, expected the folder a sweep printed (with "
                             f"{STATE_FILE} and {SPEC_FILE})")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--resume: got {str(path)!r}, expected a readable sweep state ({e})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or not all(
                k in data for k in ("tracking_uri", "stamp", "storage", "phases", "children")):
            raise ValueError(f"--resume: got {str(path)!r}, expected a sweep state of version {VERSION}")
        return cls(Path(folder), data)

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def stamp(self) -> str:
        return str(self.data["stamp"])

    @property
    def storage(self) -> str:
        return str(self.data["storage"])

    @property
    def tracking_uri(self) -> str:
        return str(self.data["tracking_uri"])

    def save(self) -> None:
        """Write the file atomically: a reader sees the old or the new state, never half."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ phases
    def phase(self, key: str) -> dict[str, Any]:
        """The record of phase ``key`` (empty if it never started)."""
        return dict(self.data["phases"].get(key, {}))

    def start_phase(self, key: str, tune_dir: str) -> None:
        if self.phase(key).get("tune_dir") != tune_dir:
            self.data["phases"][key] = {"tune_dir": tune_dir, "done": False}
            self.save()

    def finish_phase(self, key: str, **results: Any) -> None:
        self.data["phases"][key] = {**self.phase(key), **results, "done": True}
        self.save()

    # ------------------------------------------------------------ child runs
    def children(self, phase: str) -> dict[str, dict[str, str]]:
        """Tune trial id -> ``{"key": journal run key, "config": config key}`` of ``phase``."""
        return dict(self.data["children"].get(phase, {}))

    def set_child(self, phase: str, trial_id: str, key: str, config: str) -> None:
        self.data["children"].setdefault(phase, {})[trial_id] = {"key": key, "config": config}
        self.save()

    def move_child(self, phase: str, old_trial_id: str, new_trial_id: str) -> None:
        """A trial re-created under a new id (same config) takes over the old one's run."""
        kids = self.data["children"][phase]
        kids[new_trial_id] = kids.pop(old_trial_id)
        self.save()
