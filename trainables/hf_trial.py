"""The Ray Tune function trainable for ``train.engine: hf``: one trial = one `run_hf`.

Same path as `trainables.trial.train_trial`, so the driver's `MlflowTraceCallback` and the
sweep runner need not know which engine ran: `run_hf` feeds its trace rows to a
`trainables.channel.TrialSink`, and every ``train.report_every`` steps (and at the end) the
step is evaluated and the sink reports: the rows since the last report, and the params
with the first one, to the sweep's inbox; the scalars to ``tune.report``. A checkpoint
goes with every report, or with every ``train.checkpoint_every`` steps when that is a
multiple of it; it is the Trainer's ``checkpoint-<step>`` folder (``controller.json``
included). On (re)start the trial resumes from ``tune.get_checkpoint()``: weights,
optimizer, schedule, RNG, step and controller *state*; the controller's *settings* come
from the trial config (PBT/PB2 perturbations).

Import it lazily (the sweep runner picks it by ``train.engine``): it pulls in transformers.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from ray import tune

from metalearner.config import load_run_config
from metalearner.hf import StepReport, run_hf
from metalearner.tasks import Task
from trainables.channel import TrialSink
from trainables.reporting import cadence, cell_config, shared_task


def train_trial_hf(config: dict[str, Any], task: Task | None = None, task_key: tuple | None = None,
                   threads: int = 1, inbox: str | None = None) -> None:
    """Ray Tune function trainable (wrapped with `tune.with_parameters`), HF engine;
    ``inbox`` as in `trainables.trial.train_trial`."""
    torch.set_num_threads(max(1, int(threads)))
    run_dict, meta = cell_config(config)
    cfg = load_run_config(run_dict)
    checkpoint = tune.get_checkpoint()
    _, ckpt_every = cadence(cfg)
    sink = TrialSink(inbox, cfg, meta)

    def on_report(rep: StepReport) -> None:
        sink.report(rep.step, rep.last_val, rep.train_seconds, rep.diverged, checkpoint_dir=rep.checkpoint)

    mine = shared_task(task, task_key, cfg)
    with tempfile.TemporaryDirectory(prefix="metalearner-hf-trial-") as out:
        if checkpoint is None:
            run_hf(cfg, sink, out, task=mine, on_report=on_report, checkpoint_every=ckpt_every, log_params=True)
        else:
            with checkpoint.as_directory() as d:
                sink.restore(d)
                run_hf(cfg, sink, out, resume=d, task=mine, on_report=on_report, checkpoint_every=ckpt_every,
                       log_params=True)
