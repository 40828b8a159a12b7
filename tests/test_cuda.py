"""CUDA correctness (issue 10): the device fixes, exact resume, recompiles, and the torch-only
part of the project without Ray or MLflow (the GPU machine has neither).

Every CUDA test skips with "needs CUDA" on a machine without one; the import test runs
everywhere. On a GPU: `python -m pytest -q tests/test_cuda.py` (benchmarks/device_check.sh).
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo

from metalearner.config import load_run_config
from metalearner.knobs import Knobs
from metalearner.model import build_model, tiny
from metalearner.tasks.base import IGNORE_INDEX
from metalearner.train import TrainingRun

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled graphs: a training process compiles a handful, but a
    test process running many models and dtypes would pile up entries past the limit."""
    if torch.cuda.is_available():
        from torch import _dynamo

        _dynamo.reset()
    yield


# A meta-path finder that makes `import ray` / `import mlflow` (and submodules) fail the way
# a missing package does, installed before anything else in a fresh interpreter.
BLOCKER = textwrap.dedent(
    """
    import sys
    class _Blocker:
        BLOCKED = ("ray", "mlflow")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None
    sys.meta_path.insert(0, _Blocker())
    """
)


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_torch_only_part_runs_without_ray_or_mlflow(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = run_blocked(
        f"""
        for name in ("ray", "mlflow"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"the blocker let {{name}} through")
        import metalearner, metalearner.knobs, metalearner.controllers, metalearner.model
        import metalearner.tasks, metalearner.train, metalearner.trace, metalearner.config
        from metalearner.cli import main
        code = main(["train", "--task", "recall", "--controller", "ewma", "--steps", "3", "--no-mlflow",
                     "--trace-csv", "trace.csv", "--set", "model.preset=tiny", "--set", "train.batch_size=4",
                     "--set", "train.seq_len=64", "--set", "train.eval_every=3", "--set", "train.device={device}"])
        assert code == 0, code
        assert not any(m.split(".")[0] in ("ray", "mlflow") for m in sys.modules), "imported ray or mlflow"
        print("OK")
        """,
        tmp_path,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "trace.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]


def test_the_blocker_does_block(tmp_path):
    # the test above could not fail if the blocker let ray/mlflow through
    res = run_blocked("import mlflow", tmp_path)
    assert res.returncode != 0 and "blocked" in res.stderr


# -- CUDA -------------------------------------------------------------------------------------


def flex_model_config(**overrides):
    # head_dim 16: the local heads go through FlexAttention on CUDA
    return tiny(d_model=64, n_heads=4, n_global_heads=1, window=16, max_seq_len=256, **overrides)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_recall_evaluate_on_a_device_counts_what_the_cpu_model_predicts(device):
    """`RecallTask.evaluate` of a model on ``device`` (it fed CPU tensors to a CUDA model
    before the fix) gives the accuracy that the same weights' predictions on the CPU give,
    counted here. Two values per key and a few training steps make that accuracy a figure
    strictly between 0 and 1, which a wrong mask, batch or device would change."""
    trained = TrainingRun(load_run_config({
        "task": {"name": "recall", "n_pairs": 4, "distance": 16, "n_keys": 4, "n_values": 2, "eval_size": 64},
        "controller": {"name": "static"}, "model": {"preset": "tiny", "d_model": 64, "window": 16},
        "train": {"steps": 4, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 1, "device": "cpu"}}))
    trained.advance(4)
    task, cpu_model = trained.task, trained.model.eval()
    hits = total = 0
    with torch.no_grad():
        for batch in task.eval_batches():
            mask = batch["targets"] != IGNORE_INDEX
            hits += int((cpu_model(batch["tokens"]).argmax(-1)[mask] == batch["targets"][mask]).sum())
            total += int(mask.sum())
    assert 0 < hits < total and total == 64 * 4, (hits, total)

    model = copy.deepcopy(cpu_model).to(device).train()
    got = task.evaluate(model)["recall_acc"]
    assert model.training  # evaluate puts the model back in training mode
    assert abs(got - hits / total) <= 2 / total, (got, hits / total)  # another device's kernels: a near-tie may flip


def run_config(device: str, steps: int = 12, **train) -> object:
    return load_run_config(
        {
            "task": {"name": "recall", "n_pairs": 4, "distance": 16},
            "controller": {"name": "ewma", "factor": 1.2, "threshold": 0.0, "min_window": 4, "max_window": 60},
            "model": {"preset": "tiny", "d_model": 64, "window": 16},
            "train": {
                "steps": steps,
                "batch_size": 8,
                "seq_len": 64,
                "eval_every": 4,
                "eval_batches": 1,
                "warmup_steps": 2,
                "device": device,
                **train,
            },
        }
    )


@needs_cuda
def test_checkpoint_taken_on_cuda_resumes_exactly_on_cuda_and_on_cpu(tmp_path):
    straight = TrainingRun(run_config("cuda"))
    want = straight.advance(12)
    assert len({r["window"] for r in want}) > 1  # the knobs moved: the resume has state to restore
    first = TrainingRun(run_config("cuda"))
    head = first.advance(6)
    assert head == want[:6]  # deterministic on this device, or "exactly" cannot be asked
    first.save(tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["rng"]["torch"].device.type == "cpu"

    on_cuda = TrainingRun(run_config("cuda"))
    on_cuda.load(tmp_path)  # map_location=cuda: used to put the RNG byte tensors on the GPU
    assert on_cuda.model.knobs == first.model.knobs
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert on_cuda.advance(6) == want[6:]

    on_cpu = TrainingRun(run_config("cpu"))
    on_cpu.load(tmp_path)  # map_location=cpu
    for name, p in on_cpu.model.state_dict().items():
        assert torch.equal(p, saved["model"][name].cpu()), name
    assert on_cpu.model.knobs == first.model.knobs and on_cpu.step == 6
    got = on_cpu.advance(6)
    assert [r["step"] for r in got] == list(range(7, 13))
    # another device's kernels: the same run up to rounding
    for g, w in zip(got, want[6:], strict=True):
        assert abs(g["loss"] - w["loss"]) < 2e-3 * max(1.0, abs(w["loss"])), (g, w)


def dynamo_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


@needs_cuda
def test_window_and_base_moves_compile_nothing():
    torch.manual_seed(0)
    model = build_model(flex_model_config()).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (2, 200), device="cuda")

    def step(knobs: Knobs) -> None:
        model(tokens).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        model.apply_knobs(knobs)

    def step_bf16(knobs: Knobs) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(tokens).float().logsumexp(-1).mean().backward()
        opt.zero_grad()
        model.apply_knobs(knobs)

    step(Knobs(10_000.0, 16))  # compiles float32 ...
    step_bf16(Knobs(10_000.0, 16))  # ... and bf16 (autocast) once
    graphs, recompiles = dynamo_counters()
    assert graphs >= 1  # the local heads really went through the compiled FlexAttention
    builds = model.masks.builds
    for i, window in enumerate((17, 40, 100, 5, 64, 65, 129, 16, 199)):  # inside and across tiles
        step(Knobs(10_000.0 * 1.1 ** (i + 1), window))
        step_bf16(Knobs(10_000.0 * 1.1 ** (i + 1), window))
    assert dynamo_counters() == (graphs, recompiles)
    assert model.masks.builds - builds <= 5  # (17, 40, 100), 5, (64, 65), 129, 199 tilings


@needs_cuda
def test_speech_shapes_never_reach_the_recompile_limit():
    limit_flag = next(
        f for f in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(torch._dynamo.config, f)
    )
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(flex_model_config(arch="encoder_decoder", n_mels=16, max_source_frames=400)).cuda()
    model.apply_knobs(Knobs(10_000.0, 12))
    counts = []
    with torch._dynamo.config.patch(**{limit_flag: True}):  # hitting the limit raises
        for i in range(24):  # a new (batch, frames, tokens) shape every step, train and eval
            b = (1, 2, 3, 4)[(i // 2) % 4]
            frames = 48 + 16 * ((7 * i) % 23)
            n_tok = 14 + (5 * i) % 24
            feats = torch.randn(b, 16, frames, generator=gen).cuda()
            tokens = torch.randint(0, 256, (b, n_tok), generator=gen).cuda()
            model.train(i % 2 == 0)
            with torch.set_grad_enabled(model.training):
                out = model(feats, tokens)
                if model.training:
                    out.float().square().mean().backward()
            assert torch.isfinite(out).all()
            counts.append(dynamo_counters()[0])
    # bounded, not one compile per shape: the second 12 new shapes add (almost) nothing
    assert counts[-1] <= 16 and counts[-1] - counts[11] <= 2, counts


@needs_cuda
def test_speech_flex_matches_blocked_on_varying_shapes():
    torch.manual_seed(0)
    model = build_model(flex_model_config(arch="encoder_decoder", n_mels=16, max_source_frames=400)).cuda()
    model.apply_knobs(Knobs(10_000.0, 12))
    gen = torch.Generator().manual_seed(1)
    for frames, n_tok in ((96, 20), (160, 33), (272, 9)):
        feats = torch.randn(2, 16, frames, generator=gen).cuda()
        tokens = torch.randint(0, 256, (2, n_tok), generator=gen).cuda()
        outs = []
        for use_flex in (True, False):
            for m in model.modules():
                if hasattr(m, "use_flex"):
                    m.use_flex = use_flex
            with torch.no_grad():
                outs.append(model(feats, tokens))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_set_base_on_cuda_gives_the_cpu_tables():
    from metalearner.model import RotaryEmbedding

    rope = RotaryEmbedding(64, 4096, base=10_000.0).cuda()
    for base in (500.0, 12_345.678, 1e6, 3.3e9):
        rope.set_base(base)
        fresh = RotaryEmbedding(64, 4096, base=base)
        for name in ("inv_freq", "cos", "sin"):
            got, want = getattr(rope, name).cpu(), getattr(fresh, name)
            assert torch.equal(got, want) or (got - want).abs().max() <= 1.2e-7, (name, base)
