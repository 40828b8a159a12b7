"""Live table of a sweep's trials on the driver: a `rich` live display on a terminal (each
arm in its colour, the sweep's one palette: `metalearner.tracking.ui.sweep_arm_colours`),
a plain line every few seconds elsewhere. Fed by `trainables.callback.MlflowTraceCallback`."""

from __future__ import annotations

import sys
import time
from typing import Any

from trainables.reporting import LATEST_KEYS, cell_config


class ProgressTable:
    """Live table of the trials (trial, arm, status, step, loss, base, window, val loss):
    a `rich` live display on a terminal, a plain line every few seconds elsewhere."""

    def __init__(self, total_steps: int, title: str, interactive: bool | None = None) -> None:
        self.total_steps = total_steps
        self.title = title
        self.rows: dict[str, dict[str, Any]] = {}
        self.colours: dict[str, str] = {}  # arm -> "#rrggbb" (the arm cell's colour on a terminal)
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self._live = None
        self._last_plain = 0.0
        if self.interactive:
            from rich.live import Live

            self._live = Live(self._table(), refresh_per_second=2, transient=False)
            self._live.start()

    def use_colours(self, colours: dict[str, str]) -> None:
        """Show each arm in its colour (arm -> ``#rrggbb``, as in the MLflow UI and the plots)."""
        self.colours = dict(colours)

    def update(self, trial: Any, status: str, result: dict | None) -> None:
        run_cfg, meta = cell_config(trial.config)
        row = self.rows.setdefault(trial.trial_id, {"arm": meta.get("arm", ""),
                                                    "seed": run_cfg.get("train", {}).get("seed", "")})
        row["status"] = status
        if result:
            for k in LATEST_KEYS:
                row[k] = result.get(k)
        self.render()

    def _table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        t = Table(title=self.title, expand=False)
        for col in ("trial", "arm", "seed", "status", "step", "loss", "base", "window", "val loss"):
            t.add_column(col, justify="right" if col in ("step", "loss", "base", "window", "val loss") else "left")
        for tid, r in self.rows.items():
            arm = str(r["arm"])
            t.add_row(tid, Text(arm, style=self.colours[arm]) if arm in self.colours else arm, str(r["seed"]), r.get("status", ""),
                      f"{r.get('step') or 0}/{self.total_steps}", _fmt(r.get("loss")), _fmt(r.get("rope_base"), ".4g"),
                      _fmt(r.get("window"), ".0f"), _fmt(r.get("val_loss")))
        return t

    def render(self, final: bool = False) -> None:
        if self._live is not None:
            self._live.update(self._table())
            if final:
                self._live.stop()
                self._live = None
            return
        now = time.monotonic()
        if final or now - self._last_plain > 10:
            self._last_plain = now
            running = [r for r in self.rows.values() if r.get("status") == "RUNNING"]
            done = sum(r.get("status") == "TERMINATED" for r in self.rows.values())
            print(f"[{self.title}] {len(self.rows)} trials: {len(running)} running, {done} done"
                  + "".join(f" | {r['arm']}/s{r['seed']} step {r.get('step') or 0} loss {_fmt(r.get('loss'))}"
                            f" w {_fmt(r.get('window'), '.0f')}" for r in running[:4]), flush=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "" if v is None else format(v, spec)
