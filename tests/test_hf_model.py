"""Hugging Face causal LMs as the model (metalearner/model/hf_config.py, hf_model.py): the knobs move in
place and give exactly a fresh model built with them, per family; bad sections exit 2;
both engines train it to the same trace; a shipped sweep runs it end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from _view import assert_view_finds_runs, parent_of

pytest.importorskip("transformers", reason="needs the 'hf' extra")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from metalearner.config import ConfigError, load_run_config  # noqa: E402
from metalearner.knobs import Knobs  # noqa: E402
from metalearner.model.hf_config import FAMILIES, SLIDING, resolve_hf_config  # noqa: E402
from metalearner.model.hf_model import HFCausalLM  # noqa: E402
from metalearner.trace import MemorySink  # noqa: E402
from metalearner.train import TrainingRun  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
T, VOCAB = 24, 64
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64, sliding_window=8)
HYBRID = {"layer_types": [SLIDING, "full_attention"]}  # one sliding, one global layer
EXTRA: dict[str, dict] = {
    "qwen2": dict(use_sliding_window=True, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, max_window_layers=1),
    "gemma2": HYBRID, "gemma3_text": HYBRID, "cohere2": HYBRID, "olmo3": HYBRID, "exaone4": HYBRID,
    "ministral": HYBRID,
}
CASES = {mt: (mt, EXTRA.get(mt, {})) for mt in FAMILIES}
CASES["qwen2-linear-rope"] = ("qwen2", {**EXTRA["qwen2"], "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                              "rope_theta": 10_000.0}})


def family_config(model_type: str, extra: dict) -> dict:
    return {"model_type": model_type, **TINY, **copy.deepcopy(extra)}


def fresh_with(model_type: str, extra: dict, base: float, window: int, attn: str) -> torch.nn.Module:
    """transformers' own model built with rope_theta ``base`` (the sliding layers' entry of a
    per-layer-type table) and sliding_window ``window``: the reference, not our adapter."""
    kw = {**TINY, **copy.deepcopy(extra), "vocab_size": VOCAB, "sliding_window": window}
    rope = AutoConfig.for_model(model_type, **kw).rope_parameters
    if SLIDING in rope:
        rope[SLIDING]["rope_theta"] = base
    else:
        rope["rope_theta"] = base
    kw["rope_parameters"] = rope
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), attn_implementation=attn,
                                            dtype=torch.float32)


def logits_and_grads(model: torch.nn.Module, tokens: torch.Tensor, forward) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = forward(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_moved_knobs_equal_a_fresh_model_built_with_them(case):
    """Per family: after apply_knobs(b, w), logits and gradients are exactly those of
    transformers' model built with rope_theta=b, sliding_window=w and the same weights;
    nothing was replaced; and the window did change the output (T > w)."""
    model_type, extra = CASES[case]
    torch.manual_seed(0)
    mc = resolve_hf_config({"config": family_config(model_type, extra)}, vocab_size=VOCAB, seq_len=T)
    model = HFCausalLM(mc)
    tokens = torch.randint(0, VOCAB, (2, T))
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    base, window = 31_337.0, 5
    model.apply_knobs(Knobs(rope_base=base, window=window))
    assert model.knobs == Knobs(rope_base=base, window=window)
    moved, moved_grads = logits_and_grads(model, tokens, model)

    fresh = fresh_with(model_type, extra, base, window, mc.attn_implementation)
    fresh.load_state_dict(model.lm.state_dict())
    ref, ref_grads = logits_and_grads(fresh, tokens, lambda t: fresh(input_ids=t, use_cache=False).logits)
    assert torch.equal(moved, ref), (moved - ref).abs().max()
    assert moved_grads.keys() == {f"lm.{n}" for n in ref_grads}
    for name, grad in ref_grads.items():
        assert torch.equal(moved_grads[f"lm.{name}"], grad), name
    assert all(p is before[n] for n, p in model.named_parameters())  # optimizers keep their tensors
    assert all(b is buffers[n] for n, b in model.named_buffers())  # rotary tables rewritten in place

    model.apply_knobs(Knobs(rope_base=base, window=T))  # the whole sequence in view
    assert not torch.equal(model(tokens).detach(), moved)  # so the window of 5 mattered


def test_a_local_model_folder_loads_with_its_weights_and_moves_its_knobs(tmp_path):
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mistral", **TINY, vocab_size=160), attn_implementation="sdpa", dtype=torch.float32)
    saved.save_pretrained(tmp_path / "my-mistral")
    cfg = load_run_config({"task": {"name": "recall", "n_pairs": 2, "distance": 8},
                           "model": {"hf": {"path": str(tmp_path / "my-mistral"), "config": {"sliding_window": 4}}},
                           "train": {"steps": 1, "seq_len": T}})
    run = TrainingRun(cfg)
    assert run.model.knobs == Knobs(rope_base=10_000.0, window=4)  # the override of the saved config
    tokens = torch.randint(0, 129, (1, T))  # the recall task's ids; the model embeds 160
    saved.config.sliding_window = 4
    assert torch.equal(run.model(tokens), saved(input_ids=tokens, use_cache=False).logits)  # its weights
    assert run.params()["model.hf.path"] == str(tmp_path / "my-mistral")


def hf_cfg(engine: str, steps: int = 6):
    return load_run_config({
        "task": {"name": "recall", "n_pairs": 2, "distance": 8, "eval_size": 8},
        "model": {"hf": {"config": family_config("qwen2", EXTRA["qwen2"])}},
        "train": {"steps": steps, "batch_size": 4, "seq_len": T, "eval_every": 3, "eval_batches": 1,
                  "warmup_steps": 2, "engine": engine},
        "controller": {"name": "ewma", "factor": 1.3, "beta": 0.5, "threshold": 0.0},
    })


def test_both_engines_train_an_hf_model_to_the_same_trace_bit_for_bit(tmp_path):
    from metalearner.hf import run_hf

    torch_sink, hf_sink = MemorySink(), MemorySink()
    TrainingRun(hf_cfg("torch")).advance(6, torch_sink)
    run_hf(hf_cfg("hf"), hf_sink, tmp_path / "out", save_checkpoints=False)
    assert len({r["window"] for r in torch_sink.rows}) > 1 and len({r["rope_base"] for r in torch_sink.rows}) > 1
    assert torch_sink.rows == hf_sink.rows and len(hf_sink.rows) == 6
    assert hf_sink.params["model.model_type"] == "qwen2" and hf_sink.params["model.sliding_layers"] == 1


def test_a_resumed_torch_checkpoint_of_an_hf_model_continues_exactly(tmp_path):
    straight = MemorySink()
    TrainingRun(hf_cfg("torch")).advance(6, straight)
    first = TrainingRun(hf_cfg("torch"))
    first.advance(3)
    first.save(tmp_path)
    again, rest = TrainingRun(hf_cfg("torch")), MemorySink()
    again.load(tmp_path, same_config=True)
    again.advance(3, rest)
    assert rest.rows == straight.rows[3:]


@pytest.mark.parametrize("sets,words", [
    (["model.hf.config.model_type=gpt2"], ["model.hf.config.model_type: got 'gpt2'", "no RoPE"]),
    (["model.hf.config.model_type=nope"], ["model.hf.config.model_type: got 'nope'"]),
    (["model.hf.path=NOT_A_MODEL"], ["model.hf.path: got", "expected a local model folder"]),
])
def test_unusable_hf_models_exit_2_naming_model_hf_and_the_families(cli, tmp_path, sets, words):
    (tmp_path / "empty").mkdir()
    sets = [s.replace("NOT_A_MODEL", str(tmp_path / "empty")) for s in sets]
    res = cli("train", "--task", "text", "--steps", 1, "--no-mlflow", "--trace-csv", tmp_path / "t.csv",
              *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    line, = res.stderr.strip().splitlines()
    for word in words:
        assert word in line, line
    if "path" not in sets[0]:
        assert str(sorted(FAMILIES)) in line, line
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("change,field", [
    ({"use_sliding_window": False}, "model.hf.config: got a qwen2 config without sliding-window layers"),
    ({"max_window_layers": 2}, "model.hf.config: got a qwen2 config without sliding-window layers"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0}},
     "model.hf.config.rope_parameters.rope_type: got 'dynamic'"),
    ({"hiden_size": 32}, "model.hf.config.hiden_size: unknown key for model_type 'qwen2'"),
    ({"vocab_size": 300}, "model.hf.config.vocab_size: got 300, expected it unset"),
    ({"num_key_value_heads": 10**12}, "model.hf.config.num_key_value_heads: got 1000000000000, expected an int in 1"),
    ({"head_dim": 10**12}, "model.hf.config.head_dim: got 1000000000000, expected an int in 1"),
])
def test_hf_configs_whose_knobs_cannot_move_are_refused(change, field):
    section = {"config": {**family_config("qwen2", EXTRA["qwen2"]), **change}}
    with pytest.raises(ConfigError) as e:
        load_run_config({"task": {"name": "text"}, "model": {"hf": section}, "train": {"seq_len": T}})
    assert str(e.value).startswith(field) and "\n" not in str(e.value), str(e.value)


def test_hf_section_excludes_our_model_keys_and_the_speech_task():
    section = {"config": family_config("qwen2", EXTRA["qwen2"])}
    with pytest.raises(ConfigError, match=r"^model.preset: got 'tiny' with model.hf, expected it unset"):
        load_run_config({"model": {"hf": section, "preset": "tiny"}})
    with pytest.raises(ConfigError, match=r"^model.hf: got it with task.name 'speech'"):
        load_run_config({"task": {"name": "speech", "data_dir": "."}, "model": {"hf": section}})


def test_hf_qwen2_study_smoke_sweeps_compares_and_exports(cli, tmp_path, sqlite_uri):
    """experiments/hf_qwen2.yaml --smoke-test on a real local Ray and a SQLite MLflow store:
    every trace complete (the sweep's own audit), compare rebuilds the table, the best
    EWMA controller is exported."""
    res = cli("sweep", ROOT / "experiments/hf_qwen2.yaml", "--smoke-test", "--tracking-uri", sqlite_uri,
              "--storage", tmp_path / "ray", "--num-cpus", 2, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "trace audit: one point per step per key in every run" in res.stdout
    for arm in ("static", "schedule", "ewma-tuned"):
        assert arm in res.stdout
    assert len(assert_view_finds_runs(sqlite_uri, parent_of(res.stdout), searched=True)) == 3
    res = cli("compare", "hf_qwen2", "--tracking-uri", sqlite_uri, "--out", tmp_path / "report",
              "--export-best", tmp_path / "best.yaml", "--arm", "ewma-tuned", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "report" / "comparison.csv").is_file()
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())["controller"]
    assert best["name"] == "ewma" and 1.001 <= best["factor"] <= 1.05


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gemma3_text"])
def test_moved_window_reaches_the_band_attention_of_every_sliding_layer(model_type):
    """With ``attn_implementation: metalearner_local`` the band reads each sliding layer's own
    ``sliding_window``: after a move, logits and gradients match transformers' sdpa model built
    with the new values (dense window mask), so the per-layer update is what makes them agree."""
    extra = EXTRA.get(model_type, {})
    torch.manual_seed(0)
    mc = resolve_hf_config({"config": family_config(model_type, extra), "attn_implementation": "metalearner_local"},
                           vocab_size=VOCAB, seq_len=T)
    model = HFCausalLM(mc)
    tokens = torch.randint(0, VOCAB, (2, T))
    base, window = 31_337.0, 5
    model.apply_knobs(Knobs(rope_base=base, window=window))
    moved, moved_grads = logits_and_grads(model, tokens, model)
    fresh = fresh_with(model_type, extra, base, window, "sdpa")
    fresh.load_state_dict(model.lm.state_dict())
    ref, ref_grads = logits_and_grads(fresh, tokens, lambda t: fresh(input_ids=t, use_cache=False).logits)
    torch.testing.assert_close(moved, ref, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(moved_grads[f"lm.{name}"], grad, rtol=1e-4, atol=1e-5, msg=name)
