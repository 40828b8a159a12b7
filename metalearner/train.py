"""The training loop: one controlled training run, end to end.

Per optimizer step s (1-based)::

    batch  = task.train_batch(s)                 # a pure function of (seed, s)
    loss   = model(batch) with the current knobs; backward; clip; AdamW step
    knobs  = controller.observe(s, loss)         # training loss only
    model.apply_knobs(knobs)                     # used from step s + 1 on

Nothing moves during evaluation. `TrainingRun.advance` is the one loop; the CLI
(`train`), the Ray trainable and the tests all drive it. A checkpoint holds model,
optimizer, controller state, RNG states and the step — the data position and the LR
schedule are pure functions of the step — so a resumed run repeats an uninterrupted one
exactly. Must not import ray or mlflow (traces go to a `TraceSink`).

Divergence. A step whose loss or whose gradients' total norm (before clipping) is not
finite is not applied: no optimizer step (weights, AdamW moments and step count stay as
they are), gradients dropped. Its learning rate and batch are still those of its step
number, its trace point is still written (``loss`` as computed, NaN or inf; the knobs
it used), and it is counted in ``nonfinite_steps`` (a trace key written at each step
where the count changes). The controller sees the loss as always: it ignores a
non-finite one, and observes a finite loss whose gradients were not finite. After
``train.max_nonfinite`` consecutive such steps the run is `TrainingRun.diverged` and
stops; `Summary.diverged` tells the caller (the CLI exits 1, a Ray trial ends as a
failure, both tag the MLflow run ``metalearner.diverged``). `TrainingRun.skip_nonfinite` is the
one decision, shared with the Hugging Face engine.

Loading. Checkpoint files are read by `metalearner.checkpoint`: only tensors and plain
values, and a resume that must continue the same run (``metalearner train --resume``,
either engine) refuses a checkpoint whose config differs (`check_same_config`).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metalearner.checkpoint import (
    CHECKPOINT_FILE,
    RUN_STATE_FILE,
    CheckpointError,
    check_same_config,
    first_line,
    read_checkpoint,
    read_run_state,
)
from metalearner.config import ConfigError, RunConfig, flatten
from metalearner.controllers import BOUND_PARAMS, Controller
from metalearner.knobs import Knobs
from metalearner.model import ModelConfig, build_model, preset
from metalearner.model.hf_config import HFModelConfig, HFModelError, resolve_hf_config
from metalearner.model.hf_model import HFCausalLM
from metalearner.registry import build_controller
from metalearner.tasks import Task, batch_loss, build_task
from metalearner.trace import NONFINITE_KEY, TraceSink


def lr_at(step: int, cfg: Any) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, cosine decay."""
    i = step - 1
    if i < cfg.warmup_steps:
        return cfg.lr * (i + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((i - cfg.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def resolve_model_config(cfg: RunConfig, task: Task) -> ModelConfig | HFModelConfig:
    """Preset, then the user's overrides, then what the data dictates; or the HF model of
    ``model.hf`` with the task's vocabulary and sequence length."""
    if cfg.model.hf is not None:
        try:
            return resolve_hf_config(cfg.model.hf, task.model_overrides()["vocab_size"], task.seq_len)
        except HFModelError as e:
            raise ConfigError(str(e)) from None
    mc = preset(cfg.model.preset, **cfg.model.overrides)
    for key, value in task.model_overrides().items():
        setattr(mc, key, value)
    if mc.arch == "decoder":
        if "max_seq_len" in cfg.model.overrides and mc.max_seq_len < task.seq_len:
            raise ConfigError(
                f"model.max_seq_len: got {mc.max_seq_len}, expected >= train.seq_len ({task.seq_len})"
            )
        if "max_seq_len" not in cfg.model.overrides:
            mc.max_seq_len = task.seq_len
    try:
        mc.validate()
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    return mc


def build_run_model(mc: ModelConfig | HFModelConfig) -> torch.nn.Module:
    """Our model of ``mc``, or the HF causal LM behind the same interface; the weights
    are drawn from the current torch seed (or read from ``model.hf.path``)."""
    if isinstance(mc, HFModelConfig):
        return HFCausalLM(mc)
    return build_model(mc)


def window_cap(mc: ModelConfig | HFModelConfig) -> int:
    """The longest window that still changes anything: the model's sequence length."""
    if mc.arch == "encoder_decoder":
        return max(mc.max_seq_len, mc.max_source_frames)
    return mc.max_seq_len


def make_controller(cfg: RunConfig, mc: ModelConfig | HFModelConfig) -> Controller:
    settings = cfg.controller_settings()
    cap = window_cap(mc)  # DESIGN.md: the train loop caps max_window at the sequence length
    settings["max_window"] = min(int(settings.get("max_window", BOUND_PARAMS["max_window"].default)), cap)
    low = settings.get("min_window", BOUND_PARAMS["min_window"].default)
    if low > settings["max_window"]:  # never lowered behind the user's back
        raise ConfigError(f"controller.min_window: got {low}, expected at most the model's sequence length ({cap})")
    try:
        return build_controller(cfg.controller["name"], init=Knobs(mc.rope_base, mc.window), **settings)
    except ValueError as e:
        raise ConfigError(f"controller.{e}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: got 'cuda', expected a device this machine has (no CUDA here)")
    return torch.device(name)


@dataclass
class Summary:
    steps: int
    final_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    rope_base_range: tuple[float, float]
    window_range: tuple[int, int]
    seconds: float
    eval_metrics: dict[str, float] = field(default_factory=dict)
    diverged: bool = False  # ended by train.max_nonfinite consecutive non-finite steps
    nonfinite_steps: int = 0  # steps not applied (non-finite loss or gradients), resume included


class TrainingRun:
    """Model, optimizer, controller and task of one run, advanced step by step.

    Args:
        cfg: the validated run config.
        task: a prebuilt task (Ray passes a shared one); built from ``cfg`` when None.
    """

    def __init__(self, cfg: RunConfig, task: Task | None = None) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.task = task or build_task(
            cfg.task, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, eval_batches=t.eval_batches
        )
        self.model_config = resolve_model_config(cfg, self.task)
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.model = build_run_model(self.model_config).to(self.device)
        self.controller = make_controller(cfg, self.model_config)
        self.model.apply_knobs(self.controller.knobs)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(0.9, 0.95),
        )
        self.step = 0
        self.last_val: dict[str, float] = {}
        self.train_seconds = 0.0
        self.nonfinite_steps = 0  # steps not applied, in all
        self.nonfinite_streak = 0  # of those, how many in a row up to the last step

    # ------------------------------------------------------------ params
    def params(self) -> dict[str, Any]:
        """The whole resolved config, flattened with dots, for MLflow params.

        Returns:
            dotted key -> value; a setting whose value is None (an unset optional, e.g. a
            static controller's absent bounds) is left out, never logged as "null".
        """
        ctrl = {"name": self.cfg.controller["name"], **self.controller.settings()}  # a plugin: its module:Class
        task = {**asdict(self.cfg.task), **self.task.params()}
        if isinstance(self.model_config, HFModelConfig):
            model = self.model_config.params()
        else:
            model = {"preset": self.cfg.model.preset, **asdict(self.model_config)}
        flat = flatten({"task": task, "model": model, "train": asdict(self.cfg.train), "controller": ctrl})
        return {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in flat.items() if v is not None}

    # ------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its trace record (knobs *used* by this step)."""
        step = self.step + 1
        t = self.cfg.train
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        knobs = self.model.knobs
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.task.train_batch(step).items()}
        loss = batch_loss(self.model, batch)
        loss.backward()
        if t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        skipped = self.skip_nonfinite(loss, norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.item())
        self.model.apply_knobs(self.controller.observe(step, loss_value))
        self.step = step
        return self.trace_record(loss_value, knobs, lr, skipped)

    def skip_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> bool:
        """Decide, between backward (and clipping) and the optimizer step, whether this
        step is applied; both engines call it.

        Args:
            loss: the step's loss (a scalar tensor).
            grad_norm: the total norm of the gradients before clipping.

        Returns:
            True when the step must not be applied (loss or norm not finite): its
            gradients are dropped (set to None, so AdamW leaves weights, moments and step
            count alone) and it is counted. A finite step resets the streak.
        """
        norm = torch.as_tensor(grad_norm, device=loss.device)
        if bool(torch.isfinite(loss.detach()).all() & torch.isfinite(norm).all()):
            self.nonfinite_streak = 0
            return False
        for p in self.model.parameters():
            p.grad = None
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        return True

    def trace_record(self, loss: float, knobs: Knobs, lr: float, skipped: bool) -> dict[str, float]:
        """The trace record of the step just done (both engines): the loss, the knobs and
        learning rate it used, the controller's running loss, and ``nonfinite_steps`` when
        the step was skipped (the count changes only then)."""
        record = {"loss": loss, "rope_base": knobs.rope_base, "window": float(knobs.window), "lr": lr}
        if self.controller.loss_ewma is not None:
            record["loss_ewma"] = self.controller.loss_ewma
        if skipped:
            record[NONFINITE_KEY] = float(self.nonfinite_steps)
        return record

    @property
    def diverged(self) -> bool:
        """True once ``train.max_nonfinite`` steps in a row were not finite."""
        return self.nonfinite_streak >= self.cfg.train.max_nonfinite

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (+ the task's metrics); knobs and RNG streams are untouched."""
        was_training = self.model.training
        self.model.eval()
        rng = torch.get_rng_state()
        total, n = 0.0, 0
        for b in self.task.eval_batches():
            b = {k: v.to(self.device) for k, v in b.items()}
            total += float(batch_loss(self.model, b))
            n += 1
        out = {"val_loss": total / max(n, 1), **self.task.evaluate(self.model)}
        torch.set_rng_state(rng)
        self.model.train(was_training)
        self.last_val = out
        return out

    def is_eval_step(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 or step == self.cfg.train.steps

    @property
    def done(self) -> bool:
        """All ``train.steps`` done, or the run diverged."""
        return self.step >= self.cfg.train.steps or self.diverged

    def advance(self, n: int, sink: TraceSink | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Run up to ``n`` more steps (not past ``train.steps``, none once diverged),
        evaluating on schedule.

        Each step's record (with ``step`` and, at evaluation steps, ``val_loss``) goes to
        ``sink`` and is returned.
        """
        records: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for _ in range(min(n, self.cfg.train.steps - self.step)):
            if self.diverged:
                break
            rec = self.train_step()
            if self.is_eval_step(self.step):
                rec.update(self.evaluate())
            if sink is not None:
                sink.log_metrics(rec, self.step)
            records.append({"step": self.step, **rec})
            if on_step is not None:
                on_step(self.step, rec)
        self.train_seconds += time.perf_counter() - t0
        return records

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
            "train_seconds": self.train_seconds,
            "config": self.cfg.to_dict(),
            "nonfinite": {"steps": self.nonfinite_steps, "streak": self.nonfinite_streak},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything but the controller's *settings*, which stay those of this
        run's config (so a PBT perturbation is not undone by the checkpoint)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.model.apply_knobs(self.controller.knobs)
        # RNG states are CPU byte tensors even when map_location sent the rest to a GPU
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        nonfinite = state.get("nonfinite") or {}
        self.nonfinite_steps = int(nonfinite.get("steps", 0))
        self.nonfinite_streak = int(nonfinite.get("streak", 0))

    def save(self, directory: str | Path) -> Path:
        """Write ``checkpoint.pt`` into ``directory`` atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, directory: str | Path, *, same_config: bool = False) -> None:
        """Restore ``directory/checkpoint.pt`` (see `read_checkpoint`).

        Args:
            directory: the folder `save` wrote.
            same_config: refuse a checkpoint whose config differs from this run's
                (``train --resume``); a Ray trial restoring after a PBT perturbation
                passes False, as its controller settings differ on purpose.

        Raises:
            CheckpointError: unreadable, unsafe or malformed checkpoint.
            ConfigError: ``same_config`` and a differing config (names the first field).
        """
        path = Path(directory) / CHECKPOINT_FILE
        state = read_checkpoint(path, self.device)
        if same_config:
            check_same_config(state["config"], self.cfg.to_dict(), f"{path}")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: does not fit this run ({first_line(e)}); "
                                  "expected a checkpoint of the same model and controller") from None


def train(
    run: TrainingRun,
    sink: TraceSink | None = None,
    *,
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Summary:
    """Run ``run`` to ``train.steps``, tracing every step into ``sink``.

    Shows a progress bar (loss, base, window) on an interactive terminal when
    ``progress`` is None; checkpoints every ``train.checkpoint_every`` steps into
    ``checkpoint_dir`` (and at the end).
    """
    from tqdm.auto import tqdm

    cfg = run.cfg.train
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not show, unit="step", dynamic_ncols=True)
    records: list[dict[str, float]] = []

    def on_step(step: int, rec: dict[str, float]) -> None:
        bar.update(1)
        if show:
            post = {"loss": f"{rec['loss']:.3f}", "base": f"{rec['rope_base']:.4g}", "window": int(rec["window"])}
            if run.last_val:
                post["val"] = f"{run.last_val['val_loss']:.3f}"
            bar.set_postfix(post, refresh=False)

    t0 = time.perf_counter()
    every = cfg.checkpoint_every if (checkpoint_dir and cfg.checkpoint_every) else cfg.steps
    try:
        while not run.done:
            records += run.advance(every - run.step % every, sink, on_step)
            if checkpoint_dir:
                run.save(checkpoint_dir)
    finally:
        bar.close()
    return summarize(records, run, time.perf_counter() - t0)


def summarize(records: list[dict[str, float]], run: TrainingRun, seconds: float) -> Summary:
    """The `Summary` of a run's trace rows of this process (both engines build it here).

    Args:
        records: the rows of the steps run (``loss``, ``rope_base``, ``window``, and
            ``val_loss`` at evaluation steps).
        run: the run (its step, latest evaluation and non-finite counters).
        seconds: the wall time of the call.
    """
    losses = [r["loss"] for r in records]
    bases = [r["rope_base"] for r in records]
    windows = [int(r["window"]) for r in records]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    return Summary(
        steps=run.step,
        final_loss=losses[-1] if losses else float("nan"),
        final_val_loss=run.last_val.get("val_loss"),
        best_val_loss=min(vals) if vals else None,
        rope_base_range=(min(bases), max(bases)) if bases else (float("nan"),) * 2,
        window_range=(min(windows), max(windows)) if windows else (0, 0),
        seconds=seconds,
        eval_metrics={k: v for k, v in run.last_val.items() if k != "val_loss"},
        diverged=run.diverged,
        nonfinite_steps=run.nonfinite_steps,
    )


# ---------------------------------------------------------------- the hf engine's share


def save_run_state(run: TrainingRun, folder: str | Path) -> Path:
    """Write ``folder/run_state.json`` (config + non-finite counters) atomically: what a
    Hugging Face engine checkpoint holds beside the Trainer's own files."""
    path = Path(folder) / RUN_STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": run.cfg.to_dict(),
                               "nonfinite": {"steps": run.nonfinite_steps, "streak": run.nonfinite_streak}}))
    os.replace(tmp, path)
    return path


def load_run_state(run: TrainingRun, folder: str | Path) -> None:
    """Restore the non-finite counters saved by `save_run_state` (zero if absent)."""
    nonfinite = read_run_state(folder).get("nonfinite") or {}
    run.nonfinite_steps = int(nonfinite.get("steps", 0))
    run.nonfinite_streak = int(nonfinite.get("streak", 0))
