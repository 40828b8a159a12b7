"""The Hugging Face Trainer engine (``train.engine: hf``): `TrainingRun`'s run, HF's loop.

`transformers.Trainer` runs the loop (batches, forward/backward, gradient clipping, AdamW
step, LR schedule, checkpoints); everything that defines the run comes from
`metalearner.train.TrainingRun`, built exactly as for the PyTorch engine: task, model
(``resolve_model_config`` + ``build_model`` under the same seed), controller
(``make_controller``), AdamW with the same parameter groups and betas. Per optimizer
step s (1-based), as in `TrainingRun.train_step`::

    batch  = task.train_batch(s)                  # StepBatches[s - 1]; never shuffled
    loss   = batch_loss(model, batch)             # KnobTrainer.compute_loss
    clip (train.grad_clip); AdamW step; lr of s+1 # the Trainer
    knobs  = controller.observe(s, loss)          # KnobCallback.on_step_end: the loss of
    model.apply_knobs(knobs)                      # step s itself, not a logging average

so with the same config both engines produce the same trace (bitwise on CPU: same init,
batches, optimizer and learning rates). The learning rate of step s is
`metalearner.train.lr_at` exactly: a `LambdaLR` over base learning rate 1.0 whose factor
is the learning rate itself.

Checkpoints are the Trainer's (``OUTPUT_DIR/checkpoint-<step>/``: weights, optimizer,
scheduler, RNG and trainer state) plus ``controller.json`` (``controller.state_dict()``),
written in ``on_save`` and restored by `KnobTrainer.train` before the first resumed step.
Evaluation is ours (`TrainingRun.evaluate`, from the callback), not HF's ``evaluate``.

Imports transformers and accelerate (the ``hf`` extra); must not import ray, mlflow or the
CLI: `run_hf` returns a `Summary` and raises; ``metalearner train --engine hf`` (in
`metalearner.cli`) opens the sinks, prints and picks the exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metalearner.config import RunConfig
from metalearner.tasks import Batch, Task, batch_loss
from metalearner.trace import TraceSink
from metalearner.train import (
    Summary,
    TrainingRun,
    load_run_state,
    lr_at,
    save_run_state,
    summarize,
)

HF_MISSING = "the hf engine needs the 'hf' extra: pip install 'metalearner[hf]'"
try:
    import accelerate  # noqa: F401 - the Trainer needs it; fail here, with the hint
    import safetensors.torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer import TRAINING_ARGS_NAME
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
    from transformers.utils import SAFE_WEIGHTS_NAME
except ImportError as e:  # pragma: no cover - the extra is installed wherever tests run
    raise RuntimeError(HF_MISSING) from e

CONTROLLER_FILE = "controller.json"
KEEP_CHECKPOINTS = 2  # the newest checkpoint folders kept in the output folder


# ---------------------------------------------------------------- data, optimizer, schedule


class StepBatches(torch.utils.data.Dataset):
    """Item i is the whole batch of optimizer step i + 1 (``task.train_batch(i + 1)``).

    Served in order with ``batch_size=1`` and `first_item` as collate function, so the
    Trainer's step s gets exactly the batch of step s, also after it skips the first
    batches of a resumed run.
    """

    def __init__(self, task: Task, steps: int) -> None:
        self.task, self.steps = task, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Batch:
        return self.task.train_batch(i + 1)


def first_item(items: list[Batch]) -> Batch:
    return items[0]


def lr_schedule(optimizer: torch.optim.Optimizer, train_cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_at` as a `LambdaLR`: base learning rates are set to 1.0 and the factor of
    scheduler step i is ``lr_at(i + 1)``, so the optimizer runs exactly ``lr_at(s)`` at step
    s (no ``lr * (lr_at / lr)`` rounding). The lambda is a closure, so the scheduler's state
    dict (``scheduler.pt``) holds only numbers."""
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at(i + 1, train_cfg))


# ---------------------------------------------------------------- trainer and callback


@dataclass
class StepReport:
    """What `run_hf` hands ``on_report`` every ``train.report_every`` steps (and at the end);
    the trace rows themselves went to the sink, one per step, report steps evaluated.

    Args:
        step: the last step done.
        checkpoint: the ``checkpoint-<step>`` folder written at this step, or None.
        last_val: the latest evaluation (``val_loss`` + task metrics).
        train_seconds: wall time of the training steps in this process.
        diverged: the run was ended by ``train.max_nonfinite`` non-finite steps in a row
            (this is its last report).
    """

    step: int
    checkpoint: Path | None
    last_val: dict[str, float]
    train_seconds: float
    diverged: bool = False


class KnobTrainer(Trainer):
    """A `Trainer` whose loss is `batch_loss` and whose batch of step s is
    ``task.train_batch(s)``; it keeps the loss, knobs and learning rate of the step in
    flight for `KnobCallback`, and restores the controller when resuming.

    Args:
        run: the `TrainingRun` that owns task, model, controller and optimizer.
        **kwargs: passed to `transformers.Trainer` (``args``, ``callbacks``, ``optimizers``).
    """

    def __init__(self, run: TrainingRun, **kwargs: Any) -> None:
        self.run = run
        self.step_loss: torch.Tensor | None = None
        self.step_knobs = run.model.knobs
        self.step_lr = float("nan")
        self.step_grad_norm: Any = float("nan")
        super().__init__(model=run.model, train_dataset=StepBatches(run.task, run.cfg.train.steps), **kwargs)
        self.loss_is_scaled_for_ga = False  # a per-batch mean (gradient_accumulation_steps is 1)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=1, shuffle=False,
                                           collate_fn=first_item, num_workers=0)

    def compute_loss(self, model: torch.nn.Module, inputs: Batch, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss = batch_loss(model, inputs)
        if model.training:
            self.step_loss = loss.detach()
            self.step_knobs = self.run.model.knobs
            self.step_lr = float(self.optimizer.param_groups[0]["lr"])
        return (loss, None) if return_outputs else loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        # keep the pre-clip norm of the step in flight for `TrainingRun.skip_nonfinite`
        self.step_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.step_grad_norm

    # The model is a plain nn.Module with tied embeddings: save and load its weights with
    # safetensors' save_model/load_model, which store a tied tensor once.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_model(self.run.model, str(out / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save(self.args, out / TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / SAFE_WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; expected a checkpoint written by the hf engine")
        safetensors.torch.load_model(model or self.model, str(path), device=str(self.args.device))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`, restoring ``controller.json`` (and the knobs) when resuming."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise FileNotFoundError(f"no {PREFIX_CHECKPOINT_DIR}-<step> folder in {self.args.output_dir}")
        if resume_from_checkpoint:
            load_controller(self.run, resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    found = {p: p.name.rsplit("-", 1)[1] for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()}
    return sorted((p for p, step in found.items() if step.isdigit()), key=lambda p: int(found[p]))


def load_controller(run: TrainingRun, checkpoint: str | os.PathLike) -> None:
    """Restore the controller's state from ``checkpoint/controller.json`` and apply its
    knobs; its settings stay those of ``run``'s config (as in `TrainingRun.load_state_dict`)."""
    path = Path(checkpoint) / CONTROLLER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a checkpoint written by the hf engine")
    run.controller.load_state_dict(json.loads(path.read_text()))
    run.model.apply_knobs(run.controller.knobs)
    load_run_state(run, checkpoint)


def save_controller(run: TrainingRun, checkpoint: str | os.PathLike) -> None:
    path = Path(checkpoint) / CONTROLLER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.controller.state_dict()))
    os.replace(tmp, path)
    save_run_state(run, checkpoint)


class KnobCallback(TrainerCallback):
    """Moves the knobs after every optimizer step, traces it, evaluates, saves, reports.

    Args:
        trainer: the `KnobTrainer` (its step-in-flight loss, knobs and learning rate).
        sink: where each step's record goes, or None.
        checkpoint_every: save a checkpoint every this many steps and at the last step
            (0: only at the last); None: never.
        report_every: call ``on_report`` every this many steps and at the last step; those
            steps are evaluated too (as in the Ray trial).
        on_report: called with a `StepReport`, after the step's checkpoint (if any) is written.
        progress: show a tqdm bar (loss, base, window, val).
    """

    def __init__(self, trainer: KnobTrainer, sink: TraceSink | None, checkpoint_every: int | None,
                 report_every: int, on_report: Callable[[StepReport], None] | None, progress: bool) -> None:
        self.trainer, self.run = trainer, trainer.run
        self.sink = sink
        self.checkpoint_every = checkpoint_every
        self.report_every = report_every
        self.on_report = on_report
        self.progress = progress
        self.records: list[dict[str, float]] = []  # every step of this process (its Summary)
        self._report_due = False
        self._skipped = False
        self._bar: Any = None
        self._t_step = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the weights of a resumed run are loaded by now; the rotary tables and windows are
        # not in the state dict, so (re)apply the controller's knobs before the first step
        self.run.model.apply_knobs(self.run.controller.knobs)
        self.run.step = state.global_step
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t_step = time.perf_counter()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a non-finite loss or gradient norm: the Trainer's optimizer step finds no
        # gradients and changes nothing (as `TrainingRun.train_step` skips it)
        self._skipped = self.run.skip_nonfinite(self.trainer.step_loss, self.trainer.step_grad_norm)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run, step = self.run, state.global_step
        loss = float(self.trainer.step_loss.item())
        knobs = self.trainer.step_knobs
        run.model.apply_knobs(run.controller.observe(step, loss))
        run.step = step
        run.train_seconds += time.perf_counter() - self._t_step
        rec = run.trace_record(loss, knobs, self.trainer.step_lr, self._skipped)
        last = step >= state.max_steps or run.diverged
        control.should_training_stop = control.should_training_stop or run.diverged
        report = self.on_report is not None and (step % self.report_every == 0 or last)
        if run.is_eval_step(step) or report:
            rec.update(run.evaluate())
        if self.sink is not None:
            self.sink.log_metrics(rec, step)
        self.records.append({"step": step, **rec})
        every = self.checkpoint_every
        if every is not None and (last or (every > 0 and step % every == 0)):
            control.should_save = True
        if report:
            self._report_due = True
            if not control.should_save:
                self._report(step, None)
        if self._bar is not None:
            self._bar.update(1)
            post = {"loss": f"{loss:.3f}", "base": f"{knobs.rope_base:.4g}", "window": knobs.window}
            if run.last_val:
                post["val"] = f"{run.last_val['val_loss']:.3f}"
            self._bar.set_postfix(post, refresh=False)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save_controller(self.run, checkpoint)
        for old in checkpoints(args.output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        if self._report_due:
            self._report(state.global_step, checkpoint)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _report(self, step: int, checkpoint: Path | None) -> None:
        self._report_due = False
        self.on_report(StepReport(step, checkpoint, dict(self.run.last_val), self.run.train_seconds,
                                  diverged=self.run.diverged))


# ---------------------------------------------------------------- the run


def training_arguments(run: TrainingRun, output_dir: str | os.PathLike) -> TrainingArguments:
    """Trainer settings that leave every decision of the run to `TrainingRun`'s config: one
    whole batch per step, no accumulation, our clip; no HF logging, evaluation, reporting
    or hub; saving is decided by `KnobCallback`."""
    t = run.cfg.train
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.steps,
        per_device_train_batch_size=1,  # one StepBatches item = one whole batch
        gradient_accumulation_steps=1,
        max_grad_norm=t.grad_clip,
        learning_rate=t.lr,  # informational: the optimizer and schedule are passed in
        weight_decay=t.weight_decay,
        adam_beta2=0.95,
        seed=t.seed,
        use_cpu=run.device.type == "cpu",
        report_to=[],
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",  # KnobCallback decides, and keeps the newest KEEP_CHECKPOINTS
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        push_to_hub=False,
    )


def run_hf(
    cfg: RunConfig,
    sink: TraceSink | None,
    output_dir: str | os.PathLike,
    resume: bool | str | os.PathLike = False,
    task: Task | None = None,
    on_report: Callable[[StepReport], None] | None = None,
    *,
    save_checkpoints: bool = True,
    checkpoint_every: int | None = None,
    log_params: bool | None = None,
    progress: bool = False,
) -> Summary:
    """Train ``cfg`` to ``train.steps`` with the HF Trainer, tracing every step into ``sink``.

    Args:
        cfg: the validated run config.
        sink: receives the params (unless resuming) and one record per step, or None.
        output_dir: the Trainer's output folder; checkpoints go to ``checkpoint-<step>``.
        resume: True to continue from the latest checkpoint in ``output_dir``, or the path
            of a checkpoint folder; False to start fresh.
        task: a prebuilt task (Ray passes a shared one); built from ``cfg`` when None.
        on_report: called with a `StepReport` every ``train.report_every`` steps and at the end.
        save_checkpoints: write checkpoints at all.
        checkpoint_every: checkpoint every this many steps (None: ``train.checkpoint_every``;
            0: only at the end); the last step is always checkpointed.
        log_params: log the params to ``sink`` (default: unless resuming).
        progress: show a progress bar.

    Returns:
        The `Summary` of the steps run in this call.
    """
    run = TrainingRun(cfg, task=task)
    every = cfg.train.checkpoint_every if checkpoint_every is None else checkpoint_every
    trainer = KnobTrainer(run, args=training_arguments(run, output_dir),
                          optimizers=(run.optimizer, lr_schedule(run.optimizer, cfg.train)))
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    callback = KnobCallback(trainer, sink, every if save_checkpoints else None, cfg.train.report_every,
                            on_report, progress)
    trainer.add_callback(callback)
    if sink is not None and (not resume if log_params is None else log_params):
        sink.log_params(run.params())
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=None if not resume else True if resume is True else str(resume))
    finally:
        callback.close()
    return summarize(callback.records, run, time.perf_counter() - t0)

