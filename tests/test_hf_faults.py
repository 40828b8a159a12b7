"""The HF Trainer engine handles non-finite steps exactly as the PyTorch loop does: the
step is not applied, it is counted in the trace, and ``train.max_nonfinite`` in a row end
the run; its checkpoints carry the counters and the config (``run_state.json``).

Faults come from outside: learning rates so large that the real run diverges.
"""

import math

import pytest
import torch

pytest.importorskip("transformers", reason="needs the 'hf' extra")

from metalearner.config import ConfigError, load_run_config  # noqa: E402
from metalearner.hf import run_hf  # noqa: E402
from metalearner.trace import MemorySink  # noqa: E402
from metalearner.train import RUN_STATE_FILE, TrainingRun, read_run_state  # noqa: E402


def make_cfg(**train):
    return load_run_config({
        "task": {"name": "recall", "n_pairs": 4, "distance": 16, "eval_size": 32},
        "model": {"preset": "tiny", "window": 4},
        "train": {"steps": 12, "batch_size": 8, "seq_len": 32, "eval_every": 6, "eval_batches": 1,
                  "warmup_steps": 1, "max_nonfinite": 3, **train},
        "controller": {"name": "ewma", "factor": 1.3, "beta": 0.5, "threshold": 0.0},
    })


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("lr", [1e10, 100.0], ids=["nan-loss", "inf-grad-norm"])
def test_hf_skips_counts_and_ends_like_the_torch_loop(tmp_path, lr):
    cfg = make_cfg(lr=lr)
    torch_run = TrainingRun(cfg)
    torch_rows = torch_run.advance(12)
    hf_sink = MemorySink()
    summary = run_hf(cfg, hf_sink, tmp_path, checkpoint_every=0)

    assert summary.diverged and summary.steps == 4 and summary.nonfinite_steps == 3
    assert [r["step"] for r in hf_sink.rows] == [r["step"] for r in torch_rows] == [1, 2, 3, 4]
    assert [r.get("nonfinite_steps") for r in hf_sink.rows] == [None, 1.0, 2.0, 3.0]
    for h, t in zip(hf_sink.rows, torch_rows):
        assert h.keys() == t.keys() and all(same(h[k], t[k]) for k in h), (h, t)
    # the weights are those after step 1 in both engines: nothing was applied since
    reloaded = TrainingRun(cfg)
    from safetensors.torch import load_model

    load_model(reloaded.model, str(tmp_path / "checkpoint-4" / "model.safetensors"))
    for name, p in torch_run.model.state_dict().items():
        assert torch.equal(p, reloaded.model.state_dict()[name]), name
    state = read_run_state(tmp_path / "checkpoint-4")
    assert state["nonfinite"] == {"steps": 3, "streak": 3}


def test_hf_checkpoint_refuses_another_config(tmp_path):
    run_hf(make_cfg(steps=2), None, tmp_path, checkpoint_every=0)
    folder = tmp_path / "checkpoint-2"
    assert (folder / RUN_STATE_FILE).is_file()
    read_run_state(folder, make_cfg(steps=2))  # the same config passes
    with pytest.raises(ConfigError, match=r"^controller\.factor: got 1\.5, expected 1\.3"):
        read_run_state(folder, load_run_config({**make_cfg(steps=2).to_dict(),
                                                "controller": {"name": "ewma", "factor": 1.5, "beta": 0.5,
                                                               "threshold": 0.0}}))
