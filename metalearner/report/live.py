"""The review of a running sweep: one link, right from its start to its end.

`LiveReview` is what `trainables.sweep.SweepRunner` keeps while it runs: once the parent
run exists it makes the link (the saved view under the sweep's fixed `view_key`) and
writes the view and the experiment's description; as phases begin it rewrites them (the
same link opens the new view): every trial of the sweep while only searches have run,
the comparison's trials from the first one on. `metalearner.report.publish` writes the
final view and description under the same key when the report is done. Every write goes
through the sweep's journaled `MlflowWriter`; nothing here blocks on the store except
`open`, which waits (up to its timeout) for the parent run to exist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from metalearner.report.landing import kept_text, running_description
from metalearner.report.view import SHOWS, saved_view, view_key, view_state
from metalearner.tracking import NOTE_TAG, MlflowWriter, TrackingReader, experiment_url, ui_features

log = logging.getLogger(__name__)


class LiveReview:
    """The link, saved view and experiment description of one running sweep.

    Args:
        writer: the sweep's writer.
        parent_key: the parent run's key in the writer's journal.
        sweep: the parent run's name (shown in the description).
        n_runs: how many trials the view's charts must draw (the sweep's most).
        settings: controller settings a population-based scheduler changes (charted).
        metric: the spec's metric.
        about: the spec's description.
    """

    def __init__(self, writer: MlflowWriter, parent_key: str, sweep: str, n_runs: int,
                 settings: Iterable[str] = (), metric: str = "val_loss", about: str = "") -> None:
        self.writer = writer
        self.parent_key = parent_key
        self.sweep = sweep
        self.n_runs = n_runs
        self.settings = sorted(set(settings))
        self.metric = metric
        self.about = about
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.url = ""
        self.shows = ""
        self.doing = ""
        self._created_ms = 0
        self._kept = ""
        self._view = ui_features()["saved_view"]

    @property
    def key(self) -> str:
        """The saved view's id ("" until the parent run exists, or where no view is written)."""
        return view_key(self.parent_run_id) if self.parent_run_id and self._view else ""

    def open(self, shows: str, doing: str, timeout: float = 30.0) -> str:
        """Wait (up to ``timeout`` s) for the parent run, then write the view and description.

        Args:
            shows: which trials the view shows first (`metalearner.report.view.SHOWS`).
            doing: what the sweep does now, for the description.
            timeout: seconds to wait for the store to create the parent run; a sweep whose
                store is away goes on, and a later `show` tries again without waiting.

        Returns:
            The link to print, or "" while the parent run does not exist.
        """
        if self.parent_run_id is None:
            self.writer.flush()  # the parent's record goes to the writer's thread now, not at the next flush
            rid = self.writer.run_id(self.parent_key, timeout=timeout)
            if rid is None:
                self.shows, self.doing = shows, doing
                return ""
            try:  # the review is a convenience: a store that will not answer here never stops the sweep
                reader = TrackingReader(self.writer.tracking_uri)
                exp_id = reader.experiment_id(reader.find_sweep(rid))
                old = reader.experiment_tags(exp_id).get(NOTE_TAG, "")
            except Exception as e:
                log.warning("the sweep's link and view are not written: %s: %s", type(e).__name__,
                            (str(e).strip().splitlines() or [""])[0])
                self.shows, self.doing = shows, doing
                return ""
            self.parent_run_id, self.experiment_id, self._kept = rid, exp_id, kept_text(old)
            self._created_ms = int(time.time() * 1000)
            self.url = experiment_url(self.writer.tracking_uri, exp_id, self.key or None)
        self.shows, self.doing = "", ""  # write both now
        self.show(shows, doing)
        return self.url

    def show(self, shows: str | None = None, doing: str | None = None) -> None:
        """Rewrite the view (``shows``) and the description (``doing``) where they change.

        Args:
            shows: which trials the view shows; None keeps the current.
            doing: what the sweep does now; None keeps the current.
        """
        if shows is not None and shows not in SHOWS:
            raise ValueError(f"shows: got {shows!r}, expected one of {SHOWS}")
        new_shows = shows if shows is not None else self.shows
        new_doing = doing if doing is not None else self.doing
        if self.parent_run_id is None:  # the store had not made the parent at `open`: try again, no wait
            self.open(new_shows, new_doing, timeout=0.0)
            return
        assert self.experiment_id is not None
        if new_shows != self.shows and self.key:
            state = view_state(self.parent_run_id, self.n_runs, new_shows, self.settings, self.metric,
                               differences=False)  # the report adds that chart with its metric
            self.writer.set_saved_view(self.experiment_id, self.key, saved_view(state, self.key,
                                                                              created_ms=self._created_ms))
        if new_doing != self.doing:
            link = self.url[self.url.index("#"):] if "#" in self.url else self.url
            self.writer.set_experiment_tags(self.experiment_id, {NOTE_TAG: running_description(
                self.sweep, new_doing, self.parent_run_id, self.experiment_id, link, self.about, self._kept)})
        self.shows, self.doing = new_shows, new_doing
        self.writer.flush()
